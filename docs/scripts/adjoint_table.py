"""Accuracy and cost of the adjoints, for the table in docs/pages/adjoints.md.

Run: `python docs/scripts/adjoint_table.py [--out FILE]` (float64, CPU). It prints the rows
as they are measured, then the Markdown table and a machine line to paste into the page,
and writes the rows, the command and the machine to `--out` (by default
`benchmarks/results/adjoint_table.json`). With `--float32-ridge` it prints only the
relative hypergradient error of the ridge problem solved in float32 with the default
tolerances and adjoint (the FAQ's float32 figure), and writes nothing. The problems are
the ones users bring:

- ridge regression with a scalar log-penalty, 200 samples, 100 features, whose
  hypergradient has a closed form;
- per-feature L2 weights of a logistic regression on breast-cancer data (30 features);
- per-feature L2 weights of a 10-class softmax regression on scikit-learn's bundled digits
  (64 features, 640 parameters), the usual hyperparameter-optimisation benchmark;
- an iMAML-like inner problem: a 1-40-40-1 tanh MLP fitted to 10 points of a sine wave
  plus `lam/2 ||w - w_meta||^2`, differentiated with respect to `w_meta` (1761
  parameters, non-convex loss).

Apart from ridge, the reference hypergradient forms the Hessian densely with
`jax.hessian` at a solution solved to `gtol=1e-13` and applies the implicit function
theorem by hand. For each adjoint and forward tolerance it prints the relative error of
the hypergradient, its cosine with the reference (what matters when only the outer
direction is used), and the median warm time of the forward solve and of forward plus
backward.
"""

import argparse
import platform
import sys
import time
from pathlib import Path


# Run as a file, the script's folder is on the path and not the repository's root, where
# `benchmarks` (and the library itself, rather than an installed copy) are.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import lineax as lx
import numpy as np
from benchmarks._common import RESULTS_DIR, write_results
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_breast_cancer, load_digits

import lbfgs_implicit as li
from lbfgs_implicit._solver import default_gtol  # the label states the real default


def ridge_problem(dtype=jnp.float64):
    """The ridge problem with its data rounded to `dtype`; the reference is float64."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(200, 100)))
    y = X @ jnp.asarray(rng.normal(size=100)) + jnp.asarray(rng.normal(size=200))
    Xv = jnp.asarray(rng.normal(size=(100, 100)))
    yv = Xv @ jnp.asarray(rng.normal(size=100))
    Xd, yd, Xvd, yvd = (a.astype(dtype) for a in (X, y, Xv, yv))
    # The reference solves the problem the solver sees: the rounded data, in float64.
    X, y, Xv, yv = (a.astype(jnp.float64) for a in (Xd, yd, Xvd, yvd))

    def inner(w, log_lam):
        return 0.5 * jnp.mean((Xd @ w - yd) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w**2)

    def outer_of_w(w):
        return 0.5 * jnp.mean((Xvd @ w - yvd) ** 2)

    def reference(log_lam):
        n = X.shape[0]
        A = X.T @ X / n + jnp.exp(log_lam) * jnp.eye(X.shape[1])
        w = jnp.linalg.solve(A, X.T @ y / n)
        # dw/dlog_lam = -A^{-1} exp(log_lam) w
        dw = -jnp.linalg.solve(A, jnp.exp(log_lam) * w)
        return jnp.vdot(jax.grad(lambda w: 0.5 * jnp.mean((Xv @ w - yv) ** 2))(w), dw)

    x0, theta = jnp.zeros(100, dtype), jnp.asarray(-2.0, dtype)
    return "ridge, n=100", inner, outer_of_w, x0, theta, reference


def logistic_problem():
    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, va = perm[: len(y) // 2], perm[len(y) // 2 :]
    X = (X - X[tr].mean(0)) / X[tr].std(0)
    Xt, yt, Xv, yv = (jnp.asarray(a, float) for a in (X[tr], y[tr], X[va], y[va]))

    def loss(w, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def inner(w, rho):
        return loss(w, Xt, yt) + 0.5 * jnp.sum(jnp.exp(rho) * w**2)

    def outer_of_w(w):
        return loss(w, Xv, yv)

    def reference(rho):
        solver = li.LBFGS(gtol=1e-13, max_steps=10_000)
        w = li.optimize(inner, jnp.zeros(30), rho, solver=solver).params
        H = jax.hessian(inner)(w, rho)
        cross = jax.jacrev(jax.grad(inner), argnums=1)(w, rho)  # d grad_w / d rho
        return -cross.T @ jnp.linalg.solve(H, jax.grad(outer_of_w)(w))

    rho = jnp.full(30, -3.0)
    return "logistic, n=30", inner, outer_of_w, jnp.zeros(30), rho, reference


def digits_problem():
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, va = perm[: len(y) // 2], perm[len(y) // 2 :]
    std = X[tr].std(0)
    # Eight border pixels are zero in every training image: leave them unscaled.
    X = (X - X[tr].mean(0)) / np.where(std > 0, std, 1.0)
    onehot = np.eye(10)[y]
    Xt, Yt, Xv, Yv = (jnp.asarray(a, float) for a in (X[tr], onehot[tr], X[va], onehot[va]))

    def loss(w, X, Y):
        z = X @ w.reshape(64, 10)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.sum(Y * z, axis=1))

    def inner(w, rho):
        return loss(w, Xt, Yt) + 0.5 * jnp.sum(jnp.exp(rho)[:, None] * w.reshape(64, 10) ** 2)

    def outer_of_w(w):
        return loss(w, Xv, Yv)

    def reference(rho):
        solver = li.LBFGS(gtol=1e-13, max_steps=10_000)
        w = li.optimize(inner, jnp.zeros(640), rho, solver=solver).params
        H = jax.hessian(inner)(w, rho)
        cross = jax.jacrev(jax.grad(inner), argnums=1)(w, rho)
        return -cross.T @ jnp.linalg.solve(H, jax.grad(outer_of_w)(w))

    rho = jnp.full(64, -3.0)
    return "digits softmax, n=640", inner, outer_of_w, jnp.zeros(640), rho, reference


def imaml_problem():
    key = jax.random.PRNGKey(0)
    sizes = (1, 40, 40, 1)
    layers = []
    for k, (m, n) in zip(jax.random.split(key, 3), zip(sizes[:-1], sizes[1:])):
        layers.append((jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n)))
    w_meta, unravel = ravel_pytree(layers)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.uniform(-5, 5, size=20))
    ys = 2.0 * jnp.sin(xs + 0.5)
    lam = 1.0

    def mlp(w, x):
        h = x[:, None]
        params = unravel(w)
        for a, b in params[:-1]:
            h = jnp.tanh(h @ a + b)
        a, b = params[-1]
        return (h @ a + b)[:, 0]

    def inner(w, w_meta):
        return jnp.mean((mlp(w, xs[:10]) - ys[:10]) ** 2) + 0.5 * lam * jnp.sum((w - w_meta) ** 2)

    def outer_of_w(w):
        return jnp.mean((mlp(w, xs[10:]) - ys[10:]) ** 2)

    def reference(w_meta):
        solver = li.LBFGS(gtol=1e-13, max_steps=10_000)
        w = li.optimize(inner, w_meta, w_meta, solver=solver).params
        H = jax.hessian(inner)(w, w_meta)
        # d grad_w / d w_meta = -lam I
        return lam * jnp.linalg.solve(H, jax.grad(outer_of_w)(w))

    return "iMAML MLP, n=1761", inner, outer_of_w, w_meta, w_meta, reference


ADJOINTS = [
    ("ImplicitAdjoint()", li.ImplicitAdjoint()),
    ("ImplicitAdjoint(precondition=False)", li.ImplicitAdjoint(precondition=False)),
    (
        "ImplicitAdjoint(linear_solver=lx.Cholesky())",
        li.ImplicitAdjoint(linear_solver=lx.Cholesky()),
    ),
    ("QuasiNewtonAdjoint()", li.QuasiNewtonAdjoint()),
    ("QuasiNewtonAdjoint(refine_steps=5)", li.QuasiNewtonAdjoint(refine_steps=5)),
]
SOLVERS = [
    (f"default (`gtol` {default_gtol(jnp.float64):.0e})", li.LBFGS()),
    ("`gtol=gtol_l2=1e-11`", li.LBFGS(gtol=1e-11, gtol_l2=1e-11)),
]


def median_time(fn, arg, repeats=7):
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def float32_ridge():
    """The ridge hypergradient solved in float32 with the defaults, against float64."""
    _, inner, outer_of_w, x0, theta, reference = ridge_problem(jnp.float32)
    ref = jax.jit(reference)(theta.astype(jnp.float64))
    grad = jax.jit(jax.grad(lambda t: outer_of_w(li.optimize(inner, x0, t).params)))(theta)
    err = float(jnp.abs(grad.astype(jnp.float64) - ref) / jnp.abs(ref))
    print(f"ridge, n=100, float32, default tolerances: hypergradient relative error {err:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS_DIR / "adjoint_table.json"))
    parser.add_argument("--float32-ridge", action="store_true")
    opts = parser.parse_args(argv)
    if opts.float32_ridge:
        float32_ridge()
        return
    rows = []
    problems = (ridge_problem(), logistic_problem(), digits_problem(), imaml_problem())
    for name, inner, outer_of_w, x0, theta, reference in problems:
        ref = jax.jit(reference)(theta)
        for solver_name, solver in SOLVERS:
            for adjoint_name, adjoint in ADJOINTS:

                def hyper(theta, solver=solver, adjoint=adjoint):
                    sol = li.optimize(inner, x0, theta, solver=solver, adjoint=adjoint)
                    return outer_of_w(sol.params)

                fwd = jax.jit(hyper)
                both = jax.jit(jax.grad(hyper))
                grad = both(theta)
                err = float(jnp.linalg.norm(grad - ref) / jnp.linalg.norm(ref))
                cos = float(jnp.vdot(grad, ref) / (jnp.linalg.norm(grad) * jnp.linalg.norm(ref)))
                t_fwd = median_time(fwd, theta)
                t_both = median_time(both, theta)
                rows.append((name, solver_name, adjoint_name, err, cos, t_fwd, t_both))
                print(rows[-1], flush=True)

    print()
    header = ["problem", "forward tolerance", "adjoint", "relative error", "cosine"]
    print("| " + " | ".join(header + ["forward (ms)", "forward + backward (ms)"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, solver_name, adjoint_name, err, cos, t_fwd, t_both in rows:
        print(
            f"| {name} | {solver_name} | `{adjoint_name}` | {err:.1e} | {cos:.4f} "
            f"| {1e3 * t_fwd:.2f} | {1e3 * t_both:.2f} |"
        )
    print()
    print(
        f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s); jax {jax.__version__}, "
        f"lbfgs_implicit {li.__version__}."
    )
    keys = ("problem", "forward_tolerance", "adjoint", "relative_error", "cosine")
    keys += ("forward_s", "forward_backward_s")
    write_results(
        opts.out,
        "python docs/scripts/adjoint_table.py",
        argv,
        [dict(zip(keys, row)) for row in rows],
        timing="median wall seconds of 7 warm runs of the jitted function",
    )


if __name__ == "__main__":
    main()
