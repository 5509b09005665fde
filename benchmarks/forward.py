"""Forward-solve benchmark: every solver on every problem, float64, in one process.

    python -m benchmarks.forward --mode {full,quick,smoke} [--out PATH]

Per solver and problem: compile seconds (trace + lower + compile), median warm seconds of
>= 5 runs (each ended by `jax.block_until_ready`), iterations, value-and-gradient
evaluations, final value, final gradient infinity norm (recomputed by one jitted gradient
for every solver), and converged = that norm <= GTOL and a finite value.
"""

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from . import problems, solvers
from ._common import machine, RESULTS_DIR, setup, time_call, write_json


MAX_STEPS = {"full": 5000, "quick": 2000, "smoke": 200}
REPEATS = {"full": 5, "quick": 5, "smoke": 1}


def run_case(problem, solver_name, max_steps, repeats):
    row = {"problem": problem.name, "n": problem.n, "family": problem.family}
    row["solver"] = solver_name
    try:
        adapter = solvers.ADAPTERS[solver_name]
        _, compile_s, call = adapter(problem.fn, problem.x0, problem.args, max_steps)
        run_s, out = time_call(call, repeats=repeats)
        x = jnp.asarray(out["x"], problem.x0.dtype)
        value, grad = jax.jit(jax.value_and_grad(problem.fn))(x, problem.args)
        grad_inf = float(jnp.max(jnp.abs(grad)))
        value = float(value)
        row.update(
            compile_s=compile_s,
            run_s=run_s,
            iters=int(out["iters"]),
            evals=int(out["evals"]),
            value=value,
            grad_inf=grad_inf,
            converged=bool(np.isfinite(value) and grad_inf <= solvers.GTOL),
            solver_success=bool(out["status"]),
            error=None,
        )
    except Exception as e:  # a peer failing on a problem is a result, not a crash
        row.update(converged=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("full", "quick", "smoke"), default="quick")
    parser.add_argument("--out", default=None)
    parser.add_argument("--solvers", default=",".join(solvers.SOLVERS))
    parser.add_argument("--problems", default=None, help="comma-separated names to keep")
    opts = parser.parse_args(argv)
    setup()
    out = opts.out or RESULTS_DIR / f"forward-{opts.mode}.json"
    names = opts.solvers.split(",")
    keep = set(opts.problems.split(",")) if opts.problems else None
    # The first compilation in a process pays JAX's one-off start-up; do it untimed.
    jax.jit(lambda a: a + 1).lower(1.0).compile()

    rows = []
    payload = {
        "mode": opts.mode,
        "command": f"python -m benchmarks.forward --mode {opts.mode}",
        "settings": {
            "gtol": solvers.GTOL,
            "history": solvers.HISTORY,
            "max_steps": MAX_STEPS[opts.mode],
            "repeats": REPEATS[opts.mode],
            "optimistix_rtol_atol": solvers.OPTIMISTIX_TOL,
        },
        "machine": machine(),
        "rows": rows,
    }
    t_start = time.perf_counter()
    for load in problems.problem_set(opts.mode):
        try:
            problem = load()
        except Exception as e:
            rows.append({"problem": repr(load), "error": f"load failed: {e}", "converged": False})
            continue
        if keep is not None and problem.name not in keep:
            continue
        for name in names:
            row = run_case(problem, name, MAX_STEPS[opts.mode], REPEATS[opts.mode])
            rows.append(row)
            print(
                f"{problem.name:22s} n={problem.n:<7d} {name:15s} "
                + (
                    f"compile {row['compile_s']:6.2f}s run {row['run_s'] * 1e3:10.2f}ms "
                    f"it {row['iters']:5d} ev {row['evals']:5d} |g| {row['grad_inf']:.1e} "
                    f"{'ok' if row['converged'] else 'FAIL'}"
                    if row["error"] is None
                    else row["error"][:120]
                ),
                flush=True,
            )
        payload["wall_s"] = time.perf_counter() - t_start
        write_json(out, payload)
    payload["wall_s"] = time.perf_counter() - t_start
    write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()
