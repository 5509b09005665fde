"""CG steps of the implicit backward pass with and without the L-BFGS preconditioner.

L2-regularised logistic regression on scikit-learn's breast-cancer data (30 standardised
features), float64, for several regularisation strengths (smaller is worse conditioned)
and history sizes. Prints a Markdown table for `docs/pages/adjoints.md` and writes its
rows, the command and the machine to `--out` (by default
`benchmarks/results/preconditioner_table.json`).

    .venv/bin/python docs/scripts/preconditioner_table.py [--out FILE]
"""

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path


# Run as a file, the script's folder is on the path and not the repository's root, where
# `benchmarks` (and the library itself, rather than an installed copy) are.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
from benchmarks._common import RESULTS_DIR, write_results
from sklearn.datasets import load_breast_cancer

import lbfgs_implicit as li


jax.config.update("jax_enable_x64", True)


def _cg_steps(fn, lam, c, history_size, precondition):
    solver = li.LBFGS(verbose=True, history_size=history_size, max_steps=20_000)
    # "Preconditioned" is CG preconditioned by H_k from H_k v; "plain" is CG from zero.
    adjoint = (
        li.ImplicitAdjoint(memory_preconditioner=True)
        if precondition
        else li.ImplicitAdjoint(precondition=False)
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        grad = jax.grad(
            lambda h: c @ li.optimize(fn, jnp.zeros(30), h, solver=solver, adjoint=adjoint).params
        )
        g = grad(lam)
        jax.effects_barrier()
    steps = re.findall(r"implicit backward: (\d+) linear-solve steps", out.getvalue())
    return int(steps[-1]), float(g)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS_DIR / "preconditioner_table.json"))
    opts = parser.parse_args(argv)
    X, y = load_breast_cancer(return_X_y=True)
    X = jnp.asarray((X - X.mean(0)) / X.std(0))
    y = jnp.asarray(y, jnp.float64)

    def fn(w, lam):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * lam * jnp.sum(w**2)

    c = jnp.asarray(np.random.default_rng(0).normal(size=30))
    print("| L2 weight | history_size | CG steps, preconditioned | CG steps, plain | ratio |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for lam in (1e-1, 1e-3, 1e-5):
        for history_size in (10, 30):
            on, g_on = _cg_steps(fn, lam, c, history_size, True)
            off, g_off = _cg_steps(fn, lam, c, history_size, False)
            assert abs(g_on - g_off) <= 1e-6 * abs(g_off), (g_on, g_off)
            print(f"| {lam:g} | {history_size} | {on} | {off} | {off / on:.2f} |")
            rows.append(
                {
                    "l2_weight": lam,
                    "history_size": history_size,
                    "cg_steps_preconditioned": on,
                    "cg_steps_plain": off,
                    "plain_over_preconditioned": off / on,
                }
            )
    write_results(opts.out, "python docs/scripts/preconditioner_table.py", argv, rows)


if __name__ == "__main__":
    main()
