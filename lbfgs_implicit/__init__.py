"""L-BFGS in JAX with exact implicit-function-theorem gradients through the solve."""

import importlib.metadata

from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    ImplicitAdjoint as ImplicitAdjoint,
    QuasiNewtonAdjoint as QuasiNewtonAdjoint,
)
from ._cg import CG as CG
from ._history import History as History
from ._linesearch import (
    AbstractLineSearch as AbstractLineSearch,
    Backtracking as Backtracking,
    LineSearchResult as LineSearchResult,
    StrongWolfe as StrongWolfe,
)
from ._optimize import optimize as optimize
from ._predict import newton_start as newton_start
from ._sharding import vmap_split as vmap_split
from ._solution import RESULTS as RESULTS, Solution as Solution, SolveError as SolveError
from ._solver import AbstractMinimiser as AbstractMinimiser, LBFGS as LBFGS


try:
    __version__ = importlib.metadata.version("lbfgs_implicit")
except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path, not installed
    __version__ = "0+unknown"
