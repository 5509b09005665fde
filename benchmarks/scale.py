"""Memory and time per iteration at scale, against optax, jaxopt and optimistix.

The problem is a smoothing objective on `n` parameters held as one vector or as one
square matrix (the layout of a network's weights):
`f(x) = sum(a (x - b)^2 / 2 + log cosh(x)) + lam/2 sum(differences of x along each
axis)^2`, not quadratic, so every solver's line search has work to do. Each solver runs
a fixed number of iterations (stopping tests off), and time per iteration is the solve's
wall time divided by the iterations it ran. Every solver is also compiled for twice the
iterations, and the steady cost of an iteration is the difference of the two solves' times
over the difference of their iteration counts: this leaves out what a solve pays once (the
evaluation at `x0`, the first line search, which has no curvature to scale its step and
takes several trials), which the plain mean spreads over the few iterations run.

The floor is what one L-BFGS iteration cannot avoid: one value-and-gradient and two
passes over the memory (`S'g, Y'g` and `S c_s + Y c_y`), timed as one jitted function.

Timing on a shared machine: the solvers (and the floor) take turns within each round,
and the per-round ratios to ours are summarised by their median and minimum, so load
that comes and goes hits every solver alike. Memory is XLA's `temp_size_in_bytes` of
each compiled solve (deterministic), in units of the parameters' bytes.

    python -m benchmarks.scale [--n 1000000] [--shapes vector,matrix]
        [--dtypes float64,float32] [--history 10] [--iters 20] [--rounds 5]
        [--solvers lbfgs_implicit,optax,jaxopt,optimistix] [--out FILE]
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li

from ._common import machine, RESULTS_DIR, setup, write_json
from .solvers import optax_step


def _problem(n, shape, dtype):
    side = int(round(n**0.5))
    full = (n,) if shape == "vector" else (side, side)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.5, 2.0, full), dtype)
    b = jnp.asarray(rng.normal(size=full), dtype)

    def fn(x, args):
        a, b = args
        smooth = sum(jnp.sum(jnp.diff(x, axis=k) ** 2) for k in range(x.ndim))
        return jnp.sum(0.5 * a * (x - b) ** 2 + jnp.logaddexp(x, -x)) + 0.5 * smooth

    return fn, jnp.zeros(full, dtype), (a, b)


def _ours(fn, x0, args, m, iters):
    solver = li.LBFGS(history_size=m, max_steps=iters, gtol=0.0)

    def solve(x0, args):
        sol = li.optimize(fn, x0, args, solver=solver, throw=False)
        return sol.params, sol.stats["num_steps"], sol.stats["num_fun_evals"]

    return solve


def _optax(fn, x0, args, m, iters):
    import optax
    import optax.tree_utils as otu

    def solve(x0, args):
        f = lambda x: fn(x, args)  # noqa: E731
        opt = optax.lbfgs(memory_size=m)
        body = optax_step(f, opt)

        def cond(carry):
            return otu.tree_get(carry[1], "count") < iters

        x, state, evals = jax.lax.while_loop(
            cond, body, (x0, opt.init(x0), jnp.ones((), jnp.int32))
        )
        return x, otu.tree_get(state, "count"), evals

    return solve


def _jaxopt(fn, x0, args, m, iters):
    import jaxopt

    solver = jaxopt.LBFGS(fun=fn, tol=0.0, maxiter=iters, history_size=m)

    def solve(x0, args):
        x, state = solver.run(x0, args)
        return x, state.iter_num, state.num_fun_eval

    return solve


def _optimistix(fn, x0, args, m, iters):
    import optimistix as optx

    solver = optx.LBFGS(rtol=0.0, atol=0.0, history_length=m)

    def solve(x0, args):
        sol = optx.minimise(fn, solver, x0, args, max_steps=iters, throw=False)
        steps = sol.stats["num_steps"]
        return sol.value, steps, steps

    return solve


def _floor(fn, x0, m):
    """One value-and-gradient and two passes over an `m`-pair memory (as matrices).

    Returns the jitted function and its memory argument (an argument, not a constant
    folded into the program).
    """
    n = x0.size
    rng = np.random.default_rng(1)
    mem = tuple(jnp.asarray(rng.normal(size=(m, n)), x0.dtype) for _ in range(2))
    coef = jnp.asarray(rng.normal(size=(2, m)), x0.dtype)

    def one(x, args, mem, coef):
        s, y = mem
        f, g = jax.value_and_grad(fn)(x, args)
        g = g.reshape(-1)
        proj = s @ g + y @ g
        p = (proj * coef[0]) @ s + coef[1] @ y
        return f, p

    return jax.jit(one), (mem, coef)


SOLVERS = {
    "lbfgs_implicit": _ours,
    "optax": _optax,
    "jaxopt": _jaxopt,
    "optimistix": _optimistix,
}


def _timed(call):
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    return time.perf_counter() - t0, out


def _steady(row):
    """Per round: the seconds one more iteration costs, from the two solves' times."""
    extra = max(row["long_iters"] - row["iters"], 1)
    return [(t2 - t1) / extra for t1, t2 in zip(row["times_s"], row["long_times_s"])]


def case(n, shape, dtype, m, iters, rounds, names):
    fn, x0, args = _problem(n, shape, dtype)
    n_bytes = x0.size * x0.dtype.itemsize
    runs = {}
    long_runs = {}
    rows = {}
    for name in list(names):
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(SOLVERS[name](fn, x0, args, m, iters)).lower(x0, args).compile()
        except Exception as e:  # a peer failing on a case is a result, not a crash
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            names = [other for other in names if other != name]
            continue
        seconds = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        _, (x, steps, evals) = _timed(lambda c=compiled: c(x0, args))
        longer = jax.jit(SOLVERS[name](fn, x0, args, m, 2 * iters)).lower(x0, args).compile()
        _, (_, long_steps, long_evals) = _timed(lambda c=longer: c(x0, args))
        runs[name] = lambda c=compiled: c(x0, args)
        long_runs[name] = lambda c=longer: c(x0, args)
        rows[name] = {
            "compile_s": seconds,
            "temp_per_n": temp / n_bytes,
            "iters": int(steps),
            "evals": int(evals),
            "long_iters": int(long_steps),
            "long_evals": int(long_evals),
            "value": float(fn(x, args)),
            "times_s": [],
            "long_times_s": [],
        }
    floor_fn, floor_args = _floor(fn, x0, m)
    floor = floor_fn.lower(x0, args, *floor_args).compile()
    _timed(lambda: floor(x0, args, *floor_args))
    floor_times = []
    for _ in range(rounds):
        for name in names:
            rows[name]["times_s"].append(_timed(runs[name])[0])
            rows[name]["long_times_s"].append(_timed(long_runs[name])[0])
        floor_times.append(_timed(lambda: floor(x0, args, *floor_args))[0])
    out = {"n": n, "shape": shape, "dtype": jnp.dtype(dtype).name, "history_size": m}
    ours = rows.get("lbfgs_implicit")
    for name, row in rows.items():
        row["per_iter_ms"] = 1e3 * statistics.median(row["times_s"]) / max(row["iters"], 1)
        row["steady_s"] = _steady(row)
        row["steady_ms"] = 1e3 * statistics.median(row["steady_s"])
        if ours is not None:
            ratios = [
                (t_ours / ours["iters"]) / (t / row["iters"])
                for t_ours, t in zip(ours["times_s"], row["times_s"])
            ]
            row["ours_over_this_median"] = statistics.median(ratios)
            row["ours_over_this_min"] = min(ratios)
            steady = [a / b for a, b in zip(ours["steady_s"], row["steady_s"])]
            row["steady_ours_over_this_median"] = statistics.median(steady)
            row["steady_ours_over_this_min"] = min(steady)
    if ours is not None:
        ratios = [t / ours["iters"] / f for t, f in zip(ours["times_s"], floor_times)]
        out["ours_over_floor_median"] = statistics.median(ratios)
        out["ours_over_floor_min"] = min(ratios)
        steady = [t / f for t, f in zip(ours["steady_s"], floor_times)]
        out["steady_ours_over_floor_median"] = statistics.median(steady)
        out["steady_ours_over_floor_min"] = min(steady)
    out["floor_ms"] = 1e3 * statistics.median(floor_times)
    out["solvers"] = rows
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000000", help="comma-separated sizes")
    parser.add_argument("--shapes", default="vector,matrix")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--history", default="10", help="comma-separated history sizes")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--out", default=str(RESULTS_DIR / "scale.json"))
    opts = parser.parse_args(argv)
    setup()
    names = []
    for name in opts.solvers.split(","):
        try:
            if name != "lbfgs_implicit":
                __import__(name)
            names.append(name)
        except ImportError:
            print(f"skipping {name}: not installed")
    cases = []
    for n in map(int, opts.n.split(",")):
        for shape in opts.shapes.split(","):
            for dtype in opts.dtypes.split(","):
                for m in map(int, opts.history.split(",")):
                    res = case(n, shape, dtype, m, opts.iters, opts.rounds, names)
                    cases.append(res)
                    print(
                        f"n={n} {shape} {res['dtype']} m={m}: floor {res['floor_ms']:.1f} ms, "
                        f"ours/floor median {res.get('ours_over_floor_median', float('nan')):.2f}, "
                        f"steady {res.get('steady_ours_over_floor_median', float('nan')):.2f}",
                        flush=True,
                    )
                    for name, row in res["solvers"].items():
                        print(
                            f"  {name:15s} {row['per_iter_ms']:8.1f} ms/iter "
                            f"({row['iters']} iters, {row['evals']} evals) "
                            f"temp {row['temp_per_n']:5.1f} n, compile {row['compile_s']:.1f} s, "
                            f"ours/this median {row.get('ours_over_this_median', 1):.2f} "
                            f"min {row.get('ours_over_this_min', 1):.2f}; steady "
                            f"{row['steady_ms']:.1f} ms/iter ({row['long_iters']} iters, "
                            f"{row['long_evals']} evals), ours/this "
                            f"{row.get('steady_ours_over_this_median', 1):.2f}",
                            flush=True,
                        )
    out = {
        "command": "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]),
        "iters": opts.iters,
        "rounds": opts.rounds,
        "cases": cases,
        "machine": machine(),
    }
    write_json(opts.out, out)
    print(f"wrote {opts.out}")
    return out


if __name__ == "__main__":
    main()
