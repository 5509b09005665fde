"""Hypergradient benchmark: accuracy and cost of differentiating through the inner solve.

    python -m benchmarks.hypergrad --mode {full,quick,smoke} [--out PATH]
    python -m benchmarks.hypergrad --case METHOD --n N     (one sweep case, prints JSON)

Methods (each library with its own forward L-BFGS; tolerances in `FORWARD`):

- `ours-implicit`: `li.ImplicitAdjoint()`, CG preconditioned by the L-BFGS memory.
- `ours-quasinewton`: `li.QuasiNewtonAdjoint()`, the L-BFGS inverse only (approximate).
- `jaxopt-implicit`: `jaxopt.LBFGS(implicit_diff=True)`, its default backward solve
  (CG on the normal equations, SciPy-style default tolerance).
- `optimistix-implicit`: `optx.ImplicitAdjoint()` default (`AutoLinearSolver`, which
  materialises the Hessian and factorises it).
- `optimistix-implicit-cg`: `optx.ImplicitAdjoint(lineax.CG(...))` with the Hessian tagged
  symmetric positive semidefinite, `rtol = atol = eps^(3/4) = 1.8e-12`, no preconditioner.
  lineax's test is elementwise, `|r_i| <= atol + rtol |b_i|` (and likewise on the step),
  so where the right-hand side is small `atol` decides. The sweep's right-hand side
  has entries of order 1/n, so it stops at a relative residual `||r||_2 / ||b||_2` far
  above our `rtol` of eps^(2/3) = 3.7e-11 on that ratio (atol 0), and its relative
  errors grow with n while ours do not. `atol = 0` is no remedy: an elementwise test
  relative to `|b_i|` cannot be met where `b_i = 0`. Read its times with its errors.
- `unrolled`: reverse-mode through optimistix's loop (`RecursiveCheckpointAdjoint`).

Problems: ridge regression (closed-form hypergradient), per-feature L2 weights of a
logistic regression (central differences around a Newton solve), and a scaling sweep on
a smoothing problem `0.5||x - y||^2 + 0.5 e^theta ||D x||^2` whose exact hypergradient a
banded direct solve gives at any n. Each sweep case runs in its own subprocess under a
time limit; a timeout, out-of-memory or any error is recorded as that case's result.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li

from ._common import (
    compile_jit,
    current_rss_bytes,
    machine,
    peak_rss_bytes,
    RESULTS_DIR,
    setup,
    time_call,
    time_call_cpu,
    write_json,
)


METHODS = (
    "ours-implicit",
    "ours-quasinewton",
    "jaxopt-implicit",
    "optimistix-implicit",
    "optimistix-implicit-cg",
    "unrolled",
)
# Forward tolerances, tight enough that the forward solve is not what limits accuracy.
FORWARD = {"gtol": 1e-10, "jaxopt_tol": 1e-10, "optimistix_rtol_atol": 1e-12}
MAX_STEPS = 5000
# optimistix+CG's rtol and atol (an elementwise test: see the module docstring).
CG_TOL = float(np.finfo(np.float64).eps) ** 0.75
# Interleaved timing rounds of the ridge and logistic tables.
ROUNDS = 9


def make_solve(method, fn, x0):
    """`solve(args) -> x*(args)`, differentiable by `method`; `args = (theta, data)`.

    Data travel as arguments, not closed-over constants, so XLA does not embed (and
    constant-fold) them in every compiled program.
    """
    if method.startswith("ours"):
        solver = li.LBFGS(max_steps=MAX_STEPS, gtol=FORWARD["gtol"])
        adjoint = li.QuasiNewtonAdjoint() if method == "ours-quasinewton" else li.ImplicitAdjoint()

        def solve(args):
            return li.optimize(fn, x0, args, solver=solver, adjoint=adjoint, throw=False).params

        return solve
    if method == "jaxopt-implicit":
        import jaxopt

        solver = jaxopt.LBFGS(fun=fn, tol=FORWARD["jaxopt_tol"], maxiter=MAX_STEPS)
        return lambda args: solver.run(x0, args).params
    import lineax as lx
    import optimistix as optx

    tol = FORWARD["optimistix_rtol_atol"]
    solver = optx.LBFGS(rtol=tol, atol=tol)
    tags = frozenset()
    if method == "optimistix-implicit":
        adjoint = optx.ImplicitAdjoint()
    elif method == "optimistix-implicit-cg":
        adjoint = optx.ImplicitAdjoint(lx.CG(rtol=CG_TOL, atol=CG_TOL))
        tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    elif method == "unrolled":
        adjoint = optx.RecursiveCheckpointAdjoint()
    else:
        raise ValueError(f"unknown method {method!r}")

    def solve(args):
        sol = optx.minimise(
            fn, solver, x0, args, max_steps=MAX_STEPS, adjoint=adjoint, throw=False, tags=tags
        )
        return sol.value

    return solve


def _compile(method, fn, outer, x0, theta, data):
    """The forward solve's and `value_and_grad(outer)`'s compiled programs and compile times."""
    solve = make_solve(method, fn, x0)

    def loss(theta, data):
        return outer(solve((theta, data)), data)

    fwd, fwd_compile = compile_jit(loss, theta, data)
    full, full_compile = compile_jit(jax.value_and_grad(loss), theta, data)
    return fwd, fwd_compile, full, full_compile


def measure(method, fn, outer, x0, theta, data, repeats):
    """Compile and warm times of the forward solve and of `value_and_grad(outer)`."""
    fwd, fwd_compile, full, full_compile = _compile(method, fn, outer, x0, theta, data)
    fwd_s, _ = time_call(fwd, theta, data, repeats=repeats)
    full_s, (value, grad) = time_call(full, theta, data, repeats=repeats)
    return {
        "method": method,
        "compile_s": full_compile,
        "forward_compile_s": fwd_compile,
        "forward_s": fwd_s,
        "total_s": full_s,
        "backward_s": max(full_s - fwd_s, 0.0),
        "backward_share": max(full_s - fwd_s, 0.0) / full_s,
        "value": float(value),
        "grad": np.asarray(grad),
    }


def measure_interleaved(methods, fn, outer, x0, theta, data, repeats, rounds=ROUNDS):
    """`measure` for several methods, timed in turns so that load hits them alike.

    Every method is compiled first; then each of `rounds` rounds times every method's
    forward solve and value_and_grad in turn (`repeats` calls each, median). Times are
    the medians over rounds; `total_vs_first` and `total_cpu_vs_first` are the medians
    over rounds of each round's value_and_grad time over that of `methods[0]` (wall and
    CPU seconds), and `total_cpu_vs_first_range` the CPU ratio's least and greatest. A
    method that fails to compile or run gets a row with `error`.
    """
    compiled, rows = {}, {}
    for method in methods:
        try:
            compiled[method] = _compile(method, fn, outer, x0, theta, data)
        except Exception as e:
            traceback.print_exc()
            rows[method] = {"method": method, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    times = {m: {"fwd": [], "full": [], "full_cpu": []} for m in compiled}
    outputs = {}
    for _ in range(rounds):
        for method, (fwd, _, full, _) in list(compiled.items()):
            try:
                fwd_s, _, _ = time_call_cpu(fwd, theta, data, repeats=repeats)
                timed = time_call_cpu(full, theta, data, repeats=repeats)
                full_s, full_cpu, outputs[method] = timed
            except Exception as e:
                traceback.print_exc()
                rows[method] = {"method": method, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                del compiled[method], times[method]
                continue
            times[method]["fwd"].append(fwd_s)
            times[method]["full"].append(full_s)
            times[method]["full_cpu"].append(full_cpu)
    first = times.get(methods[0])
    for method, t in times.items():
        fwd_s, full_s = float(np.median(t["fwd"])), float(np.median(t["full"]))
        value, grad = outputs[method]
        row = {
            "method": method,
            "compile_s": compiled[method][3],
            "forward_compile_s": compiled[method][1],
            "forward_s": fwd_s,
            "total_s": full_s,
            "total_cpu_s": float(np.median(t["full_cpu"])),
            "backward_s": max(full_s - fwd_s, 0.0),
            "backward_share": max(full_s - fwd_s, 0.0) / full_s,
            "rounds": rounds,
            "value": float(value),
            "grad": np.asarray(grad),
        }
        if first is not None:
            wall = np.divide(t["full"], first["full"])
            cpu = np.divide(t["full_cpu"], first["full_cpu"])
            row["total_vs_first"] = float(np.median(wall))
            row["total_cpu_vs_first"] = float(np.median(cpu))
            row["total_cpu_vs_first_range"] = [float(cpu.min()), float(cpu.max())]
        rows[method] = row
    return [rows[m] for m in methods]


def _rel_err(g, ref):
    return float(np.linalg.norm(np.ravel(g) - np.ravel(ref)) / np.linalg.norm(np.ravel(ref)))


# --- Ridge regression: closed-form hypergradient -------------------------------------------


def ridge_data(n, m, m_val, seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=n) / np.sqrt(n)
    X = rng.normal(size=(m, n))
    Xv = rng.normal(size=(m_val, n))
    y = X @ w_true + 0.5 * rng.normal(size=m)
    yv = Xv @ w_true + 0.5 * rng.normal(size=m_val)
    return tuple(jnp.asarray(a) for a in (X, y, Xv, yv))


def ridge_inner(w, args):
    """Mean squared training error + e^theta/2 ||w||^2, with `args = (theta, data)`."""
    theta, (X, y, _, _) = args
    r = X @ w - y
    return 0.5 * jnp.mean(r**2) + 0.5 * jnp.exp(theta) * jnp.sum(w**2)


def ridge_outer(w, data):
    """Validation mean squared error."""
    _, _, Xv, yv = data
    return 0.5 * jnp.mean((Xv @ w - yv) ** 2)


def ridge_problem(n, m, m_val, seed=0):
    """Ridge on isotropic Gaussian features, with its closed-form hypergradient."""
    data = ridge_data(n, m, m_val, seed)
    X, y, Xv, yv = data

    def exact(theta):
        lam = np.exp(float(theta))
        Xn, yn, Xvn, yvn = (np.asarray(a) for a in (X, y, Xv, yv))
        A = Xn.T @ Xn / m + lam * np.eye(n)
        w = np.linalg.solve(A, Xn.T @ yn / m)
        dw = -np.linalg.solve(A, lam * w)  # d w / d theta, theta = log lambda
        return float(((Xvn @ w - yvn) / m_val) @ (Xvn @ dw))

    return ridge_inner, ridge_outer, jnp.zeros(n), data, exact


def ridge_accuracy(n, m, m_val, repeats, methods):
    inner, outer, x0, data, exact = ridge_problem(n, m, m_val)
    theta = jnp.asarray(np.log(0.1))
    ref = exact(theta)
    rows = _accuracy_rows(methods, inner, outer, x0, theta, data, ref, repeats)
    return {"n": n, "m": m, "reference": "closed form", "rows": rows}


# --- Per-feature L2 logistic regression: central differences -------------------------------


def logistic_problem():
    from .problems import breast_cancer, logistic_loss

    X, y = breast_cancer()
    rng = np.random.default_rng(0)
    perm = rng.permutation(X.shape[0])
    split = int(0.7 * X.shape[0])
    tr, va = perm[:split], perm[split:]
    data = (X[tr], y[tr], X[va], y[va])

    def inner(w, args):
        theta, (Xt, yt, _, _) = args
        # One L2 weight e^theta_j per feature; the intercept (last) is not penalised.
        return logistic_loss(w, Xt, yt) + 0.5 * jnp.sum(jnp.exp(theta) * w[:-1] ** 2)

    def outer(w, data):
        _, _, Xv, yv = data
        return logistic_loss(w, Xv, yv)

    return inner, outer, jnp.zeros(X.shape[1]), data


def newton_argmin(inner, x0, args, steps=50):
    """A dense Newton solve to machine precision: the reference is independent of L-BFGS."""

    def body(_, w):
        g = jax.grad(inner)(w, args)
        H = jax.hessian(inner)(w, args)
        return w - jnp.linalg.solve(H, g)

    return jax.lax.fori_loop(0, steps, body, x0)


def logistic_accuracy(repeats, methods, h=1e-5):
    inner, outer, x0, data = logistic_problem()
    theta = jnp.full(x0.size - 1, np.log(1e-2))

    @jax.jit
    def loss_newton(theta, data):
        return outer(newton_argmin(inner, x0, (theta, data)), data)

    def at(t):
        return float(loss_newton(t, data))

    ref = np.array([(at(theta + h * e) - at(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    rows = _accuracy_rows(methods, inner, outer, x0, theta, data, ref, repeats)
    return {"n": int(x0.size), "reference": f"central differences, h={h}", "rows": rows}


def _accuracy_rows(methods, inner, outer, x0, theta, data, ref, repeats):
    rows = measure_interleaved(methods, inner, outer, x0, theta, data, repeats)
    for row in rows:
        if "grad" in row:
            row["rel_error"] = _rel_err(row.pop("grad"), ref)
            row["error"] = None
        print(f"  {row['method']:24s} {_fmt(row)}", flush=True)
    return rows


def _fmt(row):
    if row.get("error"):
        return row["error"][:120]
    out = f"total {row['total_s'] * 1e3:9.2f}ms backward {row['backward_share']:5.1%}"
    if "rel_error" in row:
        out += f" rel.err {row['rel_error']:.1e}"
    if "peak_rss" in row:
        out += f" peak {row['peak_rss'] / 2**30:.2f}GiB"
    return out


# --- Ridge n = 2000: backward versus forward, optimistix, preconditioning ------------------


def backward_operators(inner, x_star, args, history):
    """The Hessian at `x_star` (matrix-free) and the forward pass's $H_k$, as lineax
    operators, as the backward pass builds them."""
    import lineax as lx

    from lbfgs_implicit._history import inverse_hessian_operator

    structure = jax.eval_shape(lambda: x_star)
    _, hvp = jax.linearize(jax.grad(lambda x: inner(x, args)), x_star)
    hessian = lx.FunctionLinearOperator(
        hvp, structure, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
    )
    return hessian, inverse_hessian_operator(history, structure)


def cg_iterations(inner, sol, v, precondition):
    """Steps of the backward linear solve, run by `ImplicitAdjoint.solve` itself on the
    Hessian at the solution and the forward pass's L-BFGS memory, as the backward pass does.

    `precondition=True` is CG preconditioned by $H_k$ from $H_k v$
    (`memory_preconditioner=True`), `False` plain CG from zero.
    """
    hessian, inverse = backward_operators(inner, sol.params, sol.args, sol.history)
    adjoint = (
        li.ImplicitAdjoint(memory_preconditioner=True)
        if precondition
        else li.ImplicitAdjoint(precondition=False)
    )
    _, result, stats = adjoint.solve(hessian, inverse, v / jnp.max(jnp.abs(v)))
    return int(stats["num_steps"]), bool(result == li.RESULTS.successful)


class _Sol:
    def __init__(self, params, args, history):
        self.params, self.args, self.history = params, args, history


def ridge_backward_case(n, m, repeats):
    """Acceptance numbers of the backward pass on float64 ridge with n inner parameters."""
    inner, outer, x0, data, exact = ridge_problem(n, m, m)
    theta = jnp.asarray(np.log(0.1))
    solver = li.LBFGS(max_steps=MAX_STEPS, gtol=FORWARD["gtol"])

    def solve(theta, data):
        return li.optimize(inner, x0, (theta, data), solver=solver).params

    def loss(theta, data):
        return outer(solve(theta, data), data)

    # Forward alone, and the VJP split: forward-with-residuals, then the pullback alone.
    fwd, _ = compile_jit(solve, theta, data)
    forward_s, _ = time_call(fwd, theta, data, repeats=repeats)
    value, pullback = jax.jit(lambda t, d: jax.vjp(lambda t: loss(t, d), t))(theta, data)
    pull = jax.jit(lambda p, ct: p(ct))
    backward_s, (grad,) = time_call(pull, pullback, jnp.ones_like(value), repeats=repeats)
    total, _ = compile_jit(jax.value_and_grad(loss), theta, data)
    total_s, _ = time_call(total, theta, data, repeats=repeats)

    sol = li.optimize(inner, x0, (theta, data), solver=solver)
    v = jax.grad(outer)(sol.params, data)
    proxy = _Sol(sol.params, (theta, data), sol.state.history)
    cg_pre, ok_pre = cg_iterations(inner, proxy, v, True)
    cg_plain, ok_plain = cg_iterations(inner, proxy, v, False)

    # optimistix's default adjoint, its pullback timed the same way.
    solve_optx = make_solve("optimistix-implicit", inner, x0)

    def loss_optx(theta, data):
        return outer(solve_optx((theta, data)), data)

    value_o, pullback_o = jax.jit(lambda t, d: jax.vjp(lambda t: loss_optx(t, d), t))(theta, data)
    optx_backward_s, (grad_o,) = time_call(
        pull, pullback_o, jnp.ones_like(value_o), repeats=repeats
    )
    optx_forward_s, _ = time_call(jax.jit(loss_optx), theta, data, repeats=repeats)
    # optimistix differentiates by a custom JVP: its linear solve (and the dense
    # factorisation) runs in the forward half of `jax.vjp`, so its pullback alone looks
    # cheap. Backward is therefore compared as value_and_grad minus the forward solve.
    optx_total, _ = compile_jit(jax.value_and_grad(loss_optx), theta, data)
    optx_total_s, _ = time_call(optx_total, theta, data, repeats=repeats)
    ref = exact(theta)
    out = {
        "n": n,
        "m": m,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "total_s": total_s,
        "backward_over_forward": backward_s / forward_s,
        "forward_steps": int(sol.stats["num_steps"]),
        "cg_steps_preconditioned": cg_pre,
        "cg_steps_plain": cg_plain,
        "cg_converged": ok_pre and ok_plain,
        "cg_ratio": cg_plain / max(cg_pre, 1),
        "optimistix_forward_s": optx_forward_s,
        "optimistix_pullback_s": optx_backward_s,
        "optimistix_total_s": optx_total_s,
        "optimistix_backward_s": max(optx_total_s - optx_forward_s, 0.0),
        "ours_total_minus_forward_s": max(total_s - forward_s, 0.0),
        "optimistix_backward_over_ours": max(optx_total_s - optx_forward_s, 0.0)
        / max(total_s - forward_s, 1e-9),
        "rel_error": _rel_err(np.asarray(grad), ref),
        "optimistix_rel_error": _rel_err(np.asarray(grad_o), ref),
    }
    for key, val in out.items():
        print(f"  {key:32s} {val}", flush=True)
    return out


# --- What the L-BFGS preconditioner buys: CG steps with and without it -------------------


def factor_ridge_problem(n, m, factors, seed=0):
    """Ridge whose features share `factors` strong common factors, as real data often do.

    The Hessian then has `factors` eigenvalues far above an otherwise Marchenko-Pastur
    bulk, the case a limited-memory preconditioner is usually expected to help with.
    """
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(n, factors))

    def features(rows):
        return rng.normal(size=(rows, n)) + rng.normal(size=(rows, factors)) @ loadings.T

    w_true = rng.normal(size=n) / np.sqrt(n)
    X, Xv = features(m), features(m)
    y = X @ w_true + 0.5 * rng.normal(size=m)
    yv = Xv @ w_true + 0.5 * rng.normal(size=m)
    data = tuple(jnp.asarray(a) for a in (X, y, Xv, yv))
    return ridge_inner, ridge_outer, jnp.zeros(n), data


def cg_steps_by_start(inner, x_star, args, history, v):
    """CG steps to the default tolerance on $H w = v$ at `x_star`, for each use of $H_k$:
    preconditioner and start $H_k v$, neither, the start only, the
    preconditioner only."""
    import lineax as lx

    from lbfgs_implicit._adjoint import default_tolerance

    hessian, inverse = backward_operators(inner, x_star, args, history)
    v = v / jnp.max(jnp.abs(v))
    solver = li.CG(rtol=default_tolerance(v.dtype), max_steps=10_000)
    start = inverse.mv(v)
    variants = {
        "preconditioned_from_Hv": {"preconditioner": inverse, "y0": start},
        "plain_from_zero": {},
        "plain_from_Hv": {"y0": start},
        "preconditioned_from_zero": {"preconditioner": inverse},
    }
    out = {}
    for name, options in variants.items():
        sol = lx.linear_solve(hessian, v, solver, options=options, throw=False)
        ok = sol.result == lx.RESULTS.successful
        out[name] = int(sol.stats["num_steps"]) if ok else None
    return out


def preconditioner_ablation(mode):
    """Backward CG steps with and without the forward pass's $H_k$ on four problems (one in
    the smoke run)."""
    small = mode == "smoke"
    n_r, n_s = (50, 100) if small else (2000, 10_000)
    cases = [
        ("ridge, isotropic features", *ridge_problem(n_r, 2 * n_r, 2 * n_r)[:4], np.log(0.1)),
        ("ridge, 5 common factors", *factor_ridge_problem(n_r, 2 * n_r, 5), np.log(0.1)),
        ("smoothing", *smoothing_problem(n_s)[:4], np.log(10.0)),
    ]
    inner, outer, x0, data = logistic_problem()
    cases.append(("per-feature L2 logistic", inner, outer, x0, data, None))
    if small:
        # The smoke run checks that the table is built: one problem, the one whose
        # constructor no other part of this script runs.
        cases = cases[1:2]
    rows = []
    for name, inner, outer, x0, data, log_lam in cases:
        theta = jnp.full(x0.shape[0] - 1, np.log(1e-2)) if log_lam is None else jnp.asarray(log_lam)
        solver = li.LBFGS(max_steps=MAX_STEPS, gtol=FORWARD["gtol"])
        sol = li.optimize(inner, x0, (theta, data), solver=solver)
        v = jax.grad(outer)(sol.params, data)
        steps = cg_steps_by_start(inner, sol.params, (theta, data), sol.state.history, v)
        row = {"problem": name, "n": int(x0.size), "forward_steps": int(sol.stats["num_steps"])}
        rows.append(row | steps)
        print(f"  {rows[-1]}", flush=True)
    return {
        "command": f"python -m benchmarks.hypergrad --mode {mode} --only-preconditioner",
        "rows": rows,
    }


# --- Scaling sweep: one subprocess per (method, n) -----------------------------------------


def smoothing_problem(n, seed=0):
    """Inner: 0.5||x - y||^2 + 0.5 e^theta ||D x||^2 (D first differences); outer: MSE to truth.

    The Hessian I + e^theta D'D is tridiagonal, so a banded direct solve gives the exact
    hypergradient at any n, while the solvers see a matrix-free objective.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 8 * np.pi, n)
    truth = np.sin(t) + 0.5 * np.sin(3.1 * t)
    y = truth + 0.3 * rng.normal(size=n)
    data = (jnp.asarray(y), jnp.asarray(truth))

    def inner(x, args):
        theta, (y, _) = args
        return 0.5 * jnp.sum((x - y) ** 2) + 0.5 * jnp.exp(theta) * jnp.sum(jnp.diff(x) ** 2)

    def outer(x, data):
        _, truth = data
        return 0.5 * jnp.mean((x - truth) ** 2)

    def exact(theta):
        from scipy.linalg import solveh_banded

        lam = float(np.exp(theta))
        diag = 1 + lam * np.r_[1.0, np.full(n - 2, 2.0), 1.0]
        band = np.zeros((2, n))
        band[0, 1:] = -lam
        band[1] = diag
        x = solveh_banded(band, y)
        dtd_x = np.r_[0.0, np.diff(x)] - np.r_[np.diff(x), 0.0]  # D'D x
        gl = (x - truth) / n
        return float(-(solveh_banded(band, gl) @ (lam * dtd_x)))

    return inner, outer, jnp.zeros(n), data, exact


def sweep_case(method, n, repeats):
    """One sweep case in this process; returns a JSON-able dict."""
    inner, outer, x0, data, exact = smoothing_problem(n)
    theta = jnp.asarray(np.log(10.0))
    ref = exact(theta)
    baseline = current_rss_bytes()
    row = measure(method, inner, outer, x0, theta, data, repeats)
    row["rel_error"] = _rel_err(row.pop("grad"), ref)
    row["peak_rss"] = peak_rss_bytes()
    row["baseline_rss"] = baseline
    row["n"] = n
    row["error"] = None
    return row


def _dense_bytes(n):
    # optimistix's default adjoint materialises the n x n Hessian (and factorises a copy).
    return 2 * 8 * n * n


def run_sweep(sizes, methods, timeout, mem_limit, repeats, rows=None, save=None):
    """Run every (n, method) case in its own process; `save()` after each, so a cut-short
    run still leaves its finished cases on disk."""
    rows = [] if rows is None else rows
    for n in sizes:
        for method in methods:
            row = {"method": method, "n": n}
            if method == "optimistix-implicit" and _dense_bytes(n) > mem_limit:
                row["error"] = (
                    f"skipped: the dense Hessian needs {_dense_bytes(n) / 2**30:.0f} GiB "
                    f"> the {mem_limit / 2**30:.0f} GiB limit"
                )
                row["status"] = "out-of-memory (predicted)"
            else:
                row.update(_subprocess_case(method, n, timeout, mem_limit, repeats))
            rows.append(row)
            print(f"  n={n:<8d} {method:24s} {_fmt(row)}", flush=True)
            if save is not None:
                save()
    return rows


def _subprocess_case(method, n, timeout, mem_limit, repeats):
    cmd = [sys.executable, "-m", "benchmarks.hypergrad", "--case", method, "--n", str(n)]
    cmd += ["--repeats", str(repeats), "--mem-limit", str(mem_limit)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "status": "timeout"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out["wall_s"] = wall
            if out.get("error"):
                out["status"] = _classify(out["error"])
            else:
                out["status"] = "ok"
            return out
    tail = (proc.stderr or proc.stdout)[-400:]
    status = "out-of-memory" if proc.returncode in (-9, 137) else _classify(tail)
    return {"error": f"exit {proc.returncode}: {tail.strip()[-300:]}", "status": status}


def _classify(text):
    low = text.lower()
    if "memory" in low or "resource_exhausted" in low or "bad_alloc" in low:
        return "out-of-memory"
    return "error"


def _child(method, n, repeats, mem_limit):
    # An address-space cap turns a runaway allocation into an error in this process
    # instead of the machine's out-of-memory killer.
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    setup()
    try:
        row = sweep_case(method, n, repeats)
    except BaseException as e:  # MemoryError and XLA's RESOURCE_EXHAUSTED included
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}", "peak_rss": peak_rss_bytes()}
    print("RESULT " + json.dumps(row, default=float), flush=True)


SWEEP = {
    "full": (100, 1_000, 10_000, 100_000, 1_000_000),
    "quick": (1_000,),
    "smoke": (100,),
}
TIMEOUT = {"full": 180, "quick": 60, "smoke": 120}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("full", "quick", "smoke"), default="quick")
    parser.add_argument("--out", default=None)
    parser.add_argument("--case", default=None, help="run one sweep case (internal)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mem-limit", type=int, default=20 * 2**30)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--only-ridge-backward", action="store_true", help="redo that case in an existing file"
    )
    parser.add_argument(
        "--only-preconditioner", action="store_true", help="redo that table in an existing file"
    )
    parser.add_argument(
        "--only-tables",
        action="store_true",
        help="redo the ridge and logistic tables in an existing file",
    )
    opts = parser.parse_args(argv)
    if opts.case:
        _child(opts.case, opts.n, opts.repeats, opts.mem_limit)
        return None
    setup()
    jax.jit(lambda a: a + 1).lower(1.0).compile()
    methods = opts.methods.split(",")
    mode = opts.mode
    repeats = 1 if mode == "smoke" else 5
    out = opts.out or RESULTS_DIR / f"hypergrad-{mode}.json"
    if opts.only_ridge_backward:
        payload = json.loads(open(out).read())
        payload["ridge_backward"] = ridge_backward_case(2000, 4000, repeats)
        payload["ridge_backward"]["command"] = (
            f"python -m benchmarks.hypergrad --mode {mode} --only-ridge-backward"
        )
        write_json(out, payload)
        return payload
    if opts.only_tables:
        payload = json.loads(open(out).read())
        ridge_n, ridge_m = (20, 60) if mode == "smoke" else (100, 300)
        payload["ridge"] = ridge_accuracy(ridge_n, ridge_m, ridge_m, repeats, methods)
        payload["logistic"] = logistic_accuracy(repeats, methods)
        command = f"python -m benchmarks.hypergrad --mode {mode} --only-tables"
        for block in ("ridge", "logistic"):
            payload[block]["command"] = command
            payload[block]["machine"] = machine()
        write_json(out, payload)
        return payload
    if opts.only_preconditioner:
        payload = json.loads(open(out).read())
        payload["preconditioner"] = preconditioner_ablation(mode)
        write_json(out, payload)
        return payload
    payload = {
        "mode": mode,
        "command": f"python -m benchmarks.hypergrad --mode {mode}",
        "settings": {"forward": FORWARD, "cg_tol": CG_TOL, "max_steps": MAX_STEPS},
        "machine": machine(),
    }
    t0 = time.perf_counter()
    ridge_n, ridge_m = (20, 60) if mode == "smoke" else (100, 300)
    print(f"ridge accuracy (n={ridge_n})", flush=True)
    payload["ridge"] = ridge_accuracy(ridge_n, ridge_m, ridge_m, repeats, methods)
    write_json(out, payload)
    print("per-feature logistic regression accuracy", flush=True)
    payload["logistic"] = logistic_accuracy(repeats, methods)
    write_json(out, payload)
    n_b = 50 if mode == "smoke" else 2000
    print(f"ridge backward case (n={n_b})", flush=True)
    payload["ridge_backward"] = ridge_backward_case(n_b, 2 * n_b, repeats)
    write_json(out, payload)
    print("CG steps with and without the L-BFGS preconditioner", flush=True)
    payload["preconditioner"] = preconditioner_ablation(mode)
    write_json(out, payload)
    print("scaling sweep", flush=True)
    mem_limit = min(
        opts.mem_limit, int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    )
    payload["sweep"] = {
        "problem": "smoothing: 0.5||x - y||^2 + 0.5 e^theta ||Dx||^2, theta = log 10",
        "timeout_s": TIMEOUT[mode],
        "mem_limit_bytes": mem_limit,
        "rows": [],
    }

    def save():
        payload["wall_s"] = time.perf_counter() - t0
        write_json(out, payload)

    sweep_methods = methods[:1] if mode == "smoke" else methods
    run_sweep(
        SWEEP[mode],
        sweep_methods,
        TIMEOUT[mode],
        mem_limit,
        repeats,
        payload["sweep"]["rows"],
        save,
    )
    payload["wall_s"] = time.perf_counter() - t0
    write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()
