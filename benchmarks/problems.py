"""The forward problem set: CUTEst (via sif2jax), extended Rosenbrock, logistic regression.

A problem is `(name, fn, x0, args)` with `fn(x, args) -> scalar`. CUTEst problems are
loaded module by module: `import sif2jax` imports all ~700 problems (about a minute and a
half here), while loading one problem file takes a second or two.
"""

import dataclasses
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    fn: Callable
    x0: Any
    args: Any
    n: int
    family: str


# Unconstrained CUTEst problems, fixed by name, from n = 2 to n = 10,000, easy (ARWHEAD,
# DQDRTIC) to hard (BROWNBS's badly scaled, DJTL's kinks, CURLY10, SPARSINE and
# MSQRTALS's ill-conditioning). Sizes are sif2jax's defaults.
CUTEST = (
    "ROSENBR",
    "BEALE",
    "BROWNBS",
    "CUBE",
    "DENSCHNA",
    "DENSCHNB",
    "HAIRY",
    "HILBERTA",
    "JENSMP",
    "DJTL",
    "BARD",
    "BOX3",
    "HELIX",
    "BROWNDEN",
    "KOWOSB",
    "BIGGS6",
    "HEART6LS",
    "PALMER1C",
    "OSBORNEB",
    "ERRINROS",
    "VARDIM",
    "GENROSE",
    "FLETCHCR",
    "MSQRTALS",
    "EDENSCH",
    "ARWHEAD",
    "BDQRTIC",
    "CHAINWOO",
    "CRAGGLVY",
    "DQDRTIC",
    "ENGVAL1",
    "FREUROTH",
    "LIARWHD",
    "NONDQUAR",
    "SROSENBR",
    "WOODS",
    "QUARTC",
    "FMINSURF",
    "SPARSINE",
    "COSINE",
    "DIXON3DQ",
    "POWER",
    "CURLY10",
)

# The quick run's subset: small, fast, and still easy to hard.
CUTEST_QUICK = ("ROSENBR", "BEALE", "BROWNBS", "BARD", "BIGGS6", "GENROSE", "ARWHEAD")

_PKG = "sif2jax.cutest._unconstrained_minimisation"


def _sif2jax_root() -> str:
    module = sys.modules.get("sif2jax")
    if module is not None:
        return module.__path__[0]
    spec = importlib.util.find_spec("sif2jax")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sif2jax is not installed: `pip install -e .[bench]`.")
    return spec.submodule_search_locations[0]


def _stub_packages() -> None:
    # Package objects whose __init__ is not run, so one problem file imports on its own.
    root = _sif2jax_root()
    path = root
    for name in ("sif2jax", "sif2jax.cutest", _PKG):
        if name != "sif2jax":
            path = f"{path}/{name.rpartition('.')[2]}"
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [path]
            sys.modules[name] = module


def _cutest_modules() -> dict[str, str]:
    init = f"{_sif2jax_root()}/cutest/_unconstrained_minimisation/__init__.py"
    out = {}
    with open(init) as f:
        for line in f:
            # Only problems sif2jax exports (its commented-out ones await review).
            if line.startswith("from ."):
                _, module, _, cls, *_ = line.split()
                out[cls] = module[1:]
    return out


def cutest(name: str) -> Problem:
    _stub_packages()
    module = importlib.import_module(f"{_PKG}.{_cutest_modules()[name]}")
    problem = getattr(module, name)()
    x0 = jnp.asarray(problem.y0, jnp.float64)

    def fn(x, args):
        return problem.objective(x, args)

    return Problem(name, fn, x0, problem.args, int(x0.size), "cutest")


def rosenbrock(n: int) -> Problem:
    """Extended Rosenbrock (Moré, Garbow & Hillstrom 1981, problem 21): n/2 uncoupled pairs."""

    def fn(x, args):
        del args
        odd, even = x[0::2], x[1::2]
        return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)

    x0 = jnp.tile(jnp.array([-1.2, 1.0]), n // 2)
    return Problem(f"rosenbrock-{n:g}", fn, x0, None, n, "rosenbrock")


def breast_cancer(standardise: bool = True):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    if standardise:
        X = (X - X.mean(0)) / X.std(0)
    X = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
    return jnp.asarray(X, jnp.float64), jnp.asarray(2.0 * y - 1.0, jnp.float64)


def logistic_loss(w, X, y):
    return jnp.mean(jnp.logaddexp(0.0, -y * (X @ w)))


def logistic(lam: float = 1e-3) -> Problem:
    """Mean logistic loss + lam/2 ||w||^2 on standardised breast-cancer data (n = 31)."""
    X, y = breast_cancer()

    def fn(w, args):
        X, y = args
        return logistic_loss(w, X, y) + 0.5 * lam * jnp.sum(w[:-1] ** 2)

    x0 = jnp.zeros(X.shape[1])
    return Problem("logreg-breast-cancer", fn, x0, (X, y), int(x0.size), "logistic")


ROSENBROCK_FULL = (2, 1000, 10_000, 100_000)
ROSENBROCK_QUICK = (2, 1000)


def problem_set(mode: str, keep=None) -> list[Callable[[], Problem]]:
    """Loaders (so a failing problem is recorded, not fatal) for `mode` in full/quick/smoke.

    With a set `keep` of names, the CUTEST problems outside it are left out before
    loading, so that a run of the other problems never imports sif2jax."""
    if mode == "smoke":
        return [lambda: rosenbrock(2), lambda: logistic()]
    sizes = ROSENBROCK_FULL if mode == "full" else ROSENBROCK_QUICK
    names = CUTEST if mode == "full" else CUTEST_QUICK
    names = names if keep is None else [name for name in names if name in keep]
    loaders = [lambda n=n: rosenbrock(n) for n in sizes] + [logistic]
    loaders += [lambda name=name: cutest(name) for name in names]
    return loaders
