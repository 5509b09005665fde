"""Bound-constrained benchmark: lbfgs_implicit vs SciPy L-BFGS-B and jaxopt.LBFGSB.

    python -m benchmarks.bounds --mode {full,quick} [--out PATH]

Same protocol as `benchmarks.forward`: float64, compile timed apart, the solvers of one
problem interleaved (`time_interleaved`), ratios within a run. Problems: nonnegative
least squares, Rosenbrock in a box (up to n = 1e5 in full mode), a box-constrained
quadratic with many active bounds, and a steep, badly scaled nonnegative Poisson
regression. Converged = projected-gradient infinity norm <= GTOL (recomputed by one
jitted gradient for every solver) and a point inside the box.
"""

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li

from ._common import compile_jit, machine, RESULTS_DIR, setup, write_json
from .forward import time_interleaved
from .solvers import wall


GTOL = 1e-6
HISTORY = 10
MAX_STEPS = 5000
SOLVERS = ("lbfgs_implicit", "scipy", "jaxopt")


class Problem:
    def __init__(self, name, fn, x0, args, lower, upper):
        self.name, self.fn, self.x0, self.args = name, fn, x0, args
        self.lower = jnp.broadcast_to(jnp.asarray(lower, x0.dtype), x0.shape)
        self.upper = jnp.broadcast_to(jnp.asarray(upper, x0.dtype), x0.shape)
        self.n = x0.size


def _nnls(n):
    rng = np.random.default_rng(n)
    A = jnp.asarray(rng.normal(size=(2 * n, n)))
    b = jnp.asarray(rng.normal(size=2 * n))

    def fn(x, args):
        A, b = args
        return 0.5 * jnp.sum((A @ x - b) ** 2)

    return Problem(f"nnls-{n}", fn, jnp.zeros(n), (A, b), 0.0, jnp.inf)


def _rosenbrock(n):
    def fn(x, args):
        del args
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    upper = np.full(n, 2.0)
    upper[::3] = 0.5  # a third of the coordinates end at their upper bound
    return Problem(f"box-rosenbrock-{n}", fn, jnp.full(n, 0.3), None, -2.0, jnp.asarray(upper))


def _quadratic(n):
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    A = jnp.asarray((q * np.geomspace(1.0, 1e3, n)) @ q.T)
    b = jnp.asarray(30.0 * rng.normal(size=n))

    def fn(x, args):
        A, b = args
        return 0.5 * x @ (A @ x) - b @ x

    return Problem(f"box-quadratic-{n}", fn, jnp.zeros(n), (A, b), -1.0, 1.0)


def _poisson(d):
    rng = np.random.default_rng(2)
    scales = np.geomspace(1e-2, 1e2, d)
    X = rng.normal(size=(10 * d, d)) * 0.3 / scales
    w = np.where(np.arange(d) % 2 == 0, 0.5, -0.5) * scales
    y = rng.poisson(np.exp(X @ w)).astype(np.float64)

    def fn(w, args):
        X, y = args
        z = X @ w
        return jnp.sum(jnp.exp(z) - y * z)

    return Problem(
        f"poisson-scaled-{d}", fn, jnp.zeros(d), (jnp.asarray(X), jnp.asarray(y)), 0.0, jnp.inf
    )


def problem_set(mode):
    if mode == "quick":
        return [
            lambda: _nnls(50),
            lambda: _rosenbrock(100),
            lambda: _quadratic(50),
            lambda: _poisson(8),
        ]
    return [
        lambda: _nnls(100),
        lambda: _nnls(1000),
        lambda: _rosenbrock(100),
        lambda: _rosenbrock(1000),
        lambda: _rosenbrock(10_000),
        lambda: _rosenbrock(100_000),
        lambda: _quadratic(200),
        lambda: _poisson(8),
        lambda: _poisson(32),
    ]


def ours(p):
    solver = li.LBFGS(history_size=HISTORY, max_steps=MAX_STEPS, gtol=GTOL)

    def solve(x0, args, lower, upper):
        sol = li.optimize(p.fn, x0, args, solver=solver, bounds=(lower, upper), throw=False)
        return {
            "x": sol.params,
            "iters": sol.stats["num_steps"],
            "evals": sol.stats["num_fun_evals"],
        }

    compiled, seconds = compile_jit(solve, p.x0, p.args, p.lower, p.upper)
    return seconds, lambda: compiled(p.x0, p.args, p.lower, p.upper)


def scipy(p):
    from scipy.optimize import Bounds, minimize

    compiled, seconds = compile_jit(jax.value_and_grad(p.fn), p.x0, p.args)

    def fun(x):
        value, grad = compiled(jnp.asarray(x), p.args)
        return float(value), np.asarray(grad)

    options = {
        "maxiter": MAX_STEPS,
        "maxfun": 20 * MAX_STEPS,
        "gtol": GTOL,
        "ftol": 0.0,
        "maxcor": HISTORY,
    }
    bounds = Bounds(np.asarray(p.lower), np.asarray(p.upper))

    def call():
        res = minimize(
            fun, np.asarray(p.x0), jac=True, method="L-BFGS-B", bounds=bounds, options=options
        )
        return {"x": res.x, "iters": res.nit, "evals": res.nfev}

    return seconds, call


def jaxopt_lbfgsb(p):
    import jaxopt

    # tol on jaxopt's own test (the 2-norm of the projected-gradient step), which implies
    # the infinity-norm test; evaluations are not counted by jaxopt (iterations only).
    solver = jaxopt.LBFGSB(fun=p.fn, maxiter=MAX_STEPS, tol=GTOL, history_size=HISTORY)

    def solve(x0, args, lower, upper):
        params, state = solver.run(x0, bounds=(lower, upper), args=args)
        return {"x": params, "iters": state.iter_num, "evals": state.num_fun_eval}

    compiled, seconds = compile_jit(solve, p.x0, p.args, p.lower, p.upper)
    return seconds, lambda: compiled(p.x0, p.args, p.lower, p.upper)


ADAPTERS = {"lbfgs_implicit": ours, "scipy": scipy, "jaxopt": jaxopt_lbfgsb}


def _measure(p, out):
    x = jnp.asarray(out["x"], p.x0.dtype)
    value, g = jax.jit(jax.value_and_grad(p.fn))(x, p.args)
    pg = jnp.where(g < 0, jnp.maximum(x - p.upper, g), jnp.minimum(x - p.lower, g))
    inside = bool(jnp.all((x >= p.lower) & (x <= p.upper)))
    pg_inf = float(jnp.max(jnp.abs(pg)))
    return {
        "iters": int(out["iters"]),
        "evals": int(out["evals"]),
        "value": float(value),
        "pg_inf": pg_inf,
        "inside": inside,
        "converged": bool(np.isfinite(float(value)) and pg_inf <= GTOL and inside),
    }


# ---------------------------------------------------------------------------------------
# Hypergradient: NNLS with a ridge weight, against the closed form on the free set


def _nnls_ridge(n):
    rng = np.random.default_rng(10 + n)
    A = rng.normal(size=(2 * n, n))
    b = rng.normal(size=2 * n)
    A_val = rng.normal(size=(n, n))
    b_val = rng.normal(size=n)
    return A, b, A_val, b_val


def _ridge_objective(x, args):
    A, b, log_lam = args
    return 0.5 * jnp.sum((A @ x - b) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(x**2)


def _closed_form_hypergradient(A, b, A_val, b_val, log_lam):
    """The exact d(outer)/d(log lam) from the free set of a tightly solved NNLS ridge.

    The free set comes from SciPy's `nnls` on the stacked system; then
    x_F = (A_F'A_F + lam I)^-1 A_F'b, dx_F/dlog(lam) = -lam (A_F'A_F + lam I)^-1 x_F.
    """
    from scipy.optimize import nnls

    lam = float(np.exp(log_lam))
    n = A.shape[1]
    x, _ = nnls(np.vstack([A, np.sqrt(lam) * np.eye(n)]), np.concatenate([b, np.zeros(n)]))
    free = x > 0
    H = A[:, free].T @ A[:, free] + lam * np.eye(int(free.sum()))
    x_free = np.linalg.solve(H, A[:, free].T @ b)
    full = np.zeros(n)
    full[free] = x_free
    grad_outer = A_val.T @ (A_val @ full - b_val)
    return float(grad_outer[free] @ (-lam * np.linalg.solve(H, x_free))), int(free.sum())


def hypergradient_rows(sizes):
    """Our hypergradient and jaxopt's implicit differentiation of `LBFGSB`, against the
    closed form, timed interleaved (value and gradient of the outer loss, jitted)."""
    import jaxopt

    rows = []
    log_lam = 0.0
    for n in sizes:
        A, b, A_val, b_val = _nnls_ridge(n)
        want, n_free = _closed_form_hypergradient(A, b, A_val, b_val, log_lam)
        data = tuple(map(jnp.asarray, (A, b, A_val, b_val)))
        x0, lower, upper = jnp.zeros(n), jnp.zeros(n), jnp.full(n, jnp.inf)
        solver = li.LBFGS(history_size=HISTORY, max_steps=MAX_STEPS)  # default gtol 1e-10
        jsolver = jaxopt.LBFGSB(
            fun=_ridge_objective,
            maxiter=MAX_STEPS,
            tol=1e-10,
            history_size=HISTORY,
            implicit_diff=True,
        )

        def outer(x, A_val, b_val):
            return 0.5 * jnp.sum((A_val @ x - b_val) ** 2)

        def ours(log_lam, data):
            A, b, A_val, b_val = data
            sol = li.optimize(
                _ridge_objective, x0, (A, b, log_lam), solver=solver, bounds=(lower, upper)
            )
            return outer(sol.params, A_val, b_val)

        def theirs(log_lam, data):
            A, b, A_val, b_val = data
            x, _ = jsolver.run(x0, bounds=(lower, upper), args=(A, b, log_lam))
            return outer(x, A_val, b_val)

        prepared = []
        for name, f in (("lbfgs_implicit", ours), ("jaxopt", theirs)):
            compiled, compile_s = compile_jit(jax.value_and_grad(f), jnp.asarray(log_lam), data)
            call = lambda c=compiled: c(jnp.asarray(log_lam), data)  # noqa: E731
            first_s, _ = wall(call)
            prepared.append((name, compile_s, call, first_s))
        medians, _, outs = time_interleaved(
            [c for _, _, c, _ in prepared], [t for *_, t in prepared], 5, 0.3
        )
        for (name, compile_s, _, _), run_s, (_, grad) in zip(prepared, medians, outs):
            rows.append(
                {
                    "n": n,
                    "free": n_free,
                    "solver": name,
                    "rel_error": abs(float(grad) - want) / abs(want),
                    "run_s": run_s,
                    "compile_s": compile_s,
                }
            )
            print(
                f"hypergradient nnls-ridge-{n:<6d} {name:15s} rel.err={rows[-1]['rel_error']:.1e}"
                f" run={run_s * 1e3:9.2f} ms compile={compile_s:.1f} s",
                flush=True,
            )
    return rows


def hypergradient_lines(rows):
    """The Markdown table of the hypergradient comparison (also used by `benchmarks.report`)."""
    by = {}
    for r in rows:
        by.setdefault(r["n"], {})[r["solver"]] = r
    lines = [
        "| n | free coordinates | ours: relative error | jaxopt: relative error | time / jaxopt |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, s in by.items():
        o, j = s["lbfgs_implicit"], s["jaxopt"]
        lines.append(
            f"| {n} | {o['free']} | {o['rel_error']:.1e} | {j['rel_error']:.1e} | "
            f"{o['run_s'] / j['run_s']:.2f} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("full", "quick"), default="quick")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    setup()
    out_path = opts.out or RESULTS_DIR / f"bounds-{opts.mode}.json"
    jax.jit(lambda a: a + 1).lower(1.0).compile()
    rows = []
    t0 = time.perf_counter()
    for load in problem_set(opts.mode):
        p = load()
        prepared = []
        for name in SOLVERS:
            row = {"problem": p.name, "n": p.n, "solver": name}
            try:
                compile_s, call = ADAPTERS[name](p)
                first_s, _ = wall(call)
                row["compile_s"] = compile_s
                prepared.append((row, call, first_s))
            except Exception as e:  # a peer failing is a result
                row.update(converged=False, error=f"{type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
                rows.append(row)
        medians, counts, outs = time_interleaved(
            [c for _, c, _ in prepared], [t for _, _, t in prepared], 5, 0.3
        )
        for (row, _, _), run_s, count, out in zip(prepared, medians, counts, outs):
            row.update(run_s=run_s, repeats=count, **_measure(p, out))
            rows.append(row)
            print(
                f"{p.name:24s} {row['solver']:15s} iters={row['iters']:5d} "
                f"evals={row['evals']:5d} f={row['value']:.10e} pg={row['pg_inf']:.1e} "
                f"conv={row['converged']} run={run_s * 1e3:9.2f} ms "
                f"compile={row['compile_s']:.1f} s",
                flush=True,
            )
    hyper = hypergradient_rows([50] if opts.mode == "quick" else [100, 1000])
    payload = {
        "mode": opts.mode,
        "command": f"python -m benchmarks.bounds --mode {opts.mode}",
        "settings": {"gtol": GTOL, "history": HISTORY, "max_steps": MAX_STEPS},
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
        "hypergradient": hyper,
    }
    write_json(out_path, payload)
    _report(rows, hyper)


def table_lines(rows):
    """The Markdown table of a run (also used by `benchmarks.report`)."""
    by = {}
    for r in rows:
        by.setdefault(r["problem"], {})[r["solver"]] = r
    lines = [
        "| problem | n | ours iters / evals | SciPy iters / evals | jaxopt iters / evals | "
        "time / SciPy | time / jaxopt | all converged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    ev = []
    for name, s in by.items():
        o, sc, jo = s.get("lbfgs_implicit"), s.get("scipy"), s.get("jaxopt")
        if not (o and sc and "run_s" in o and "run_s" in sc):
            continue
        if o["converged"] and sc["converged"]:
            ev.append(o["evals"] / sc["evals"])
        ok = jo is not None and "run_s" in jo
        tj = f"{o['run_s'] / jo['run_s']:.2f}" if ok else "–"
        jcount = f"{jo['iters']} / {jo['evals']}" if ok else "failed"
        conv = all(r.get("converged") for r in (o, sc, jo) if r is not None)
        lines.append(
            f"| {name} | {o['n']} | {o['iters']} / {o['evals']} | {sc['iters']} / {sc['evals']} "
            f"| {jcount} | {o['run_s'] / sc['run_s']:.2f} | {tj} | {conv} |"
        )
    if ev:
        lines += [
            "",
            f"Geometric mean of our evaluations / SciPy's: {np.exp(np.mean(np.log(ev))):.2f}.",
        ]
    return lines


def _report(rows, hyper=()):
    print("\n".join(["", *table_lines(rows), "", *hypergradient_lines(hyper)]))


if __name__ == "__main__":
    main()
