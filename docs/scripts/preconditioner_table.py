"""CG steps of the implicit backward pass with and without the L-BFGS preconditioner.

L2-regularised logistic regression on scikit-learn's breast-cancer data (30 standardised
features), float64, for several regularisation strengths (smaller is worse conditioned)
and history sizes. Prints a Markdown table for `docs/pages/adjoints.md`.

    .venv/bin/python docs/scripts/preconditioner_table.py
"""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
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


def main():
    X, y = load_breast_cancer(return_X_y=True)
    X = jnp.asarray((X - X.mean(0)) / X.std(0))
    y = jnp.asarray(y, jnp.float64)

    def fn(w, lam):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * lam * jnp.sum(w**2)

    c = jnp.asarray(np.random.default_rng(0).normal(size=30))
    print("| L2 weight | history_size | CG steps, preconditioned | CG steps, plain | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for lam in (1e-1, 1e-3, 1e-5):
        for history_size in (10, 30):
            on, g_on = _cg_steps(fn, lam, c, history_size, True)
            off, g_off = _cg_steps(fn, lam, c, history_size, False)
            assert abs(g_on - g_off) <= 1e-6 * abs(g_off), (g_on, g_off)
            print(f"| {lam:g} | {history_size} | {on} | {off} | {off / on:.2f} |")


if __name__ == "__main__":
    main()
