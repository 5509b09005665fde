"""Benchmarks of lbfgs_implicit against SciPy, optax, jaxopt and optimistix (not a package API)."""

import os


# SciPy's L-BFGS-B alternates small BLAS calls with calls into XLA; idle OpenBLAS threads
# spin and steal the cores XLA needs (100x slower SciPy runs on 2 cores). One BLAS thread
# is also what these problem sizes need. Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
