"""Forward-solve benchmark: every solver on every problem, float64, in one process.

    python -m benchmarks.forward --mode {full,quick,smoke} [--out PATH]

Per solver and problem: compile seconds (trace + lower + compile), median warm seconds
(each run ended by `jax.block_until_ready`) and median CPU seconds of the process per run
(`run_cpu_s`, `time.process_time`: XLA's worker threads included), iterations,
value-and-gradient evaluations, final value, final gradient infinity norm (recomputed by
one jitted gradient for every solver), and converged = that norm <= GTOL and a finite
value.

Timing: the solvers of one problem take turns over five rounds, each running a block of
consecutive calls per turn, so that a slow spell of a shared machine lands on all of them
alike rather than on whichever ran then, while caches stay warm as in a loop. Each
solver runs at least `REPEATS` times and, when a run is short, until its runs add up to
`MIN_SECONDS` (at most `MAX_REPEATS` runs): a median of five sub-millisecond runs moves
by tens of percent between identical invocations.

Dispatch: on CPU, XLA runs a program on the calling thread only when its static cost
estimate is below 1000 flops (`cheap_computation_` in XLA's CPU client, where a while
loop's body counts once); any other program is handed to a worker thread, which costs
about 20 microseconds per call on a loaded two-core machine. On problems with two to
six parameters that hand-off is a large part of a solve, and it falls on whichever
solver's program is estimated above the line (ours at 970-1190 flops on the CUTEst
problems with n = 2, optimistix's at 310-510, optax's at 500-1000; each row records its
program's estimate as `xla_flops`). `--sync-dispatch` sets `jax_cpu_enable_async_dispatch` off
for every solver, so that the comparison measures the solvers' own work; the default
measures what a caller sees with JAX's defaults.
"""

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from . import problems, solvers
from ._common import machine, RESULTS_DIR, setup, write_json


MAX_STEPS = {"full": 5000, "quick": 2000, "smoke": 200}
REPEATS = {"full": 5, "quick": 5, "smoke": 1}
MIN_SECONDS = {"full": 0.5, "quick": 0.3, "smoke": 0.0}
MAX_REPEATS = 300


def xla_flops(compiled) -> float | None:
    """XLA's static cost estimate of a compiled program (SciPy's: of its objective), the
    number the CPU client compares with 1000 to run it on the calling thread."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports one
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def prepare_case(problem, solver_name, max_steps):
    """Compile one solver on one problem and run it once (untimed, warming caches).

    Returns `(row, call, first_seconds)`; `call` is None when the solver failed.
    """
    row = {"problem": problem.name, "n": problem.n, "family": problem.family}
    row["solver"] = solver_name
    try:
        adapter = solvers.ADAPTERS[solver_name]
        compiled, compile_s, call = adapter(problem.fn, problem.x0, problem.args, max_steps)
        row["compile_s"] = compile_s
        row["xla_flops"] = xla_flops(compiled)
        first_s, _ = solvers.wall(call)
        return row, call, first_s
    except Exception as e:  # a peer failing on a problem is a result, not a crash
        row.update(converged=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
        return row, None, None


def time_interleaved(calls, firsts, repeats, min_seconds, rounds=5, cpu=None):
    """Median seconds per call, from `rounds` rounds that each run every call in turn.

    A call's count is `repeats`, raised to `min_seconds / first run` when runs are short;
    within a round a call runs a block of about `count / rounds` times in a row, so its
    caches are warm as in a loop, while a slow spell of the machine is shared by all.
    Returns `(medians, counts, outputs)`; with a list `cpu`, also appends each call's
    median CPU seconds of this process (`time.process_time`, all its threads) to it.
    """
    counts = [
        min(MAX_REPEATS, max(repeats, int(np.ceil(min_seconds / max(t, 1e-9))))) for t in firsts
    ]
    blocks = [max(1, -(-count // rounds)) for count in counts]
    times = [[] for _ in calls]
    cpu_times = [[] for _ in calls]
    outputs = [None] * len(calls)
    while any(len(t) < count for t, count in zip(times, counts)):
        for i, call in enumerate(calls):
            for _ in range(min(blocks[i], counts[i] - len(times[i]))):
                c0 = time.process_time()
                seconds, outputs[i] = solvers.wall(call)
                cpu_times[i].append(time.process_time() - c0)
                times[i].append(seconds)
    if cpu is not None:
        cpu.extend(float(np.median(t)) for t in cpu_times)
    return [float(np.median(t)) for t in times], counts, outputs


def finish_case(problem, row, run_s, repeats, out, run_cpu_s=None):
    try:
        x = jnp.asarray(out["x"], problem.x0.dtype)
        value, grad = jax.jit(jax.value_and_grad(problem.fn))(x, problem.args)
        grad_inf = float(jnp.max(jnp.abs(grad)))
        value = float(value)
        row.update(
            run_s=run_s,
            run_cpu_s=run_cpu_s,
            repeats=repeats,
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
    parser.add_argument(
        "--sync-dispatch",
        action="store_true",
        help="run every program on the calling thread (jax_cpu_enable_async_dispatch off)",
    )
    opts = parser.parse_args(argv)
    setup()
    if opts.sync_dispatch:
        # Read when JAX creates its CPU client, so before the first computation.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    out = opts.out or RESULTS_DIR / f"forward-{opts.mode}.json"
    names = opts.solvers.split(",")
    keep = set(opts.problems.split(",")) if opts.problems else None
    # The first compilation in a process pays JAX's one-off start-up; do it untimed.
    jax.jit(lambda a: a + 1).lower(1.0).compile()

    rows = []
    payload = {
        "mode": opts.mode,
        "command": f"python -m benchmarks.forward --mode {opts.mode}"
        + (f" --problems {opts.problems}" if opts.problems else "")
        + (f" --solvers {opts.solvers}" if opts.solvers != ",".join(solvers.SOLVERS) else "")
        + (" --sync-dispatch" if opts.sync_dispatch else ""),
        "settings": {
            "gtol": solvers.GTOL,
            "history": solvers.HISTORY,
            "max_steps": MAX_STEPS[opts.mode],
            "repeats": REPEATS[opts.mode],
            "min_seconds": MIN_SECONDS[opts.mode],
            "max_repeats": MAX_REPEATS,
            "optimistix_rtol_atol": solvers.OPTIMISTIX_TOL,
            "sync_dispatch": opts.sync_dispatch,
        },
        "machine": machine(),
        "rows": rows,
    }
    t_start = time.perf_counter()
    for load in problems.problem_set(opts.mode, keep):
        try:
            problem = load()
        except Exception as e:
            rows.append({"problem": repr(load), "error": f"load failed: {e}", "converged": False})
            continue
        if keep is not None and problem.name not in keep:
            continue
        prepared = [prepare_case(problem, name, MAX_STEPS[opts.mode]) for name in names]
        live = [(row, call, t) for row, call, t in prepared if call is not None]
        cpu = []
        medians, counts, outputs = time_interleaved(
            [call for _, call, _ in live],
            [t for _, _, t in live],
            REPEATS[opts.mode],
            MIN_SECONDS[opts.mode],
            cpu=cpu,
        )
        for (row, _, _), run_s, run_cpu_s, count, result in zip(
            live, medians, cpu, counts, outputs
        ):
            finish_case(problem, row, run_s, count, result, run_cpu_s)
        for row, _, _ in prepared:
            name = row["solver"]
            rows.append(row)
            print(
                f"{problem.name:22s} n={problem.n:<7d} {name:15s} "
                + (
                    f"compile {row['compile_s']:6.2f}s run {row['run_s'] * 1e3:10.2f}ms "
                    f"cpu {row['run_cpu_s'] * 1e3:10.2f}ms "
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
