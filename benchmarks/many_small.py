"""Many small problems in one program: each small forward problem from `T` starts.

The case of a user with many small problems (multi-start, per-task inner problems):
one jitted program per JAX library that solves `T` starting points, so that Python
dispatch is paid once per batch. `--form vmap` (default) is a `jax.vmap` of the solve,
where a batch runs as long as its slowest start keeps it running; `--form map` solves
the starts one after the other with `jax.lax.map`, each exactly as a single solve
inside a jitted outer loop (a bilevel step, a scan over tasks) runs it: the solver's
own cost per solve, without Python's dispatch of a single call.

Every CUTEst problem of the forward set with at most `--max-n` parameters, extended
Rosenbrock with n = 2 and the breast-cancer logistic regression; starts
`x0 (1 + 0.2 u) + 0.1 v` with `u, v` uniform on [-1, 1], seeded by the problem's name.
Solvers and stopping rules are those of `benchmarks.forward` (SciPy has no batched
form); under `vmap`, `lbfgs_implicit` picks its batched form itself, as it does for
users.

Per problem and solver: the median wall and CPU seconds per batch (the solvers taking
turns over `--rounds` rounds; a solver whose first batch takes more than `SLOW_S` is
timed by that batch alone), the starts that converged ($\\|\\nabla f\\|_\\infty \\le$
`GTOL` at the returned point, recomputed by one jitted gradient for all), and the sum of
each start's own evaluations (jaxopt's count includes one value-only evaluation per
iteration, see `benchmarks.solvers`).

    python -m benchmarks.many_small [--mode full|quick|smoke] [--form vmap|map]
        [--tasks 64] [--max-n 50]
"""

import argparse
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import problems, solvers
from ._common import compile_jit, machine, RESULTS_DIR, setup, write_json


SOLVERS = tuple(solvers.JAX_SOLVES)
MAX_STEPS = {"full": 5000, "quick": 1000, "smoke": 200}
ROUNDS = {"full": 5, "quick": 3, "smoke": 1}
MIN_SECONDS = {"full": 0.3, "quick": 0.1, "smoke": 0.0}
MAX_REPEATS = 200
# A batch slower than this is timed once (its first run): jaxopt's zoom under `vmap`
# runs every start for as many iterations as the slowest, which can take a minute.
SLOW_S = 3.0
QUICK = ("BEALE", "BARD", "BIGGS6")
FORMS = ("vmap", "map")


def starts(problem, tasks: int):
    """`tasks` starting points around the problem's own, the same on every run."""
    rng = np.random.default_rng(zlib.crc32(problem.name.encode()))
    x0 = np.asarray(problem.x0)
    u = rng.uniform(-1, 1, (tasks, *x0.shape))
    v = rng.uniform(-1, 1, (tasks, *x0.shape))
    return jnp.asarray(x0[None] * (1 + 0.2 * u) + 0.1 * v, x0.dtype)


def _loaders(mode, keep):
    if mode == "smoke":
        return [lambda: problems.rosenbrock(2)]
    names = QUICK if mode == "quick" else problems.CUTEST
    names = [n for n in names if keep is None or n in keep]
    loaders = [lambda: problems.rosenbrock(2), problems.logistic]
    loaders += [lambda name=name: problems.cutest(name) for name in names]
    return loaders


def batched(single, form):
    """`single(x0, args)` over a leading axis of starts: `jax.vmap`, or `jax.lax.map`
    (one start after the other)."""
    if form == "vmap":
        return jax.vmap(single, in_axes=(0, None))
    return lambda x0s, args: jax.lax.map(lambda x0: single(x0, args), x0s)


def prepare(problem, name, x0s, max_steps, form="vmap"):
    """Compile `name`'s batched solve and run it once; `(row, call, first seconds, output)`
    (`call` and the rest None when the solver failed)."""
    row = {"problem": problem.name, "n": problem.n, "tasks": int(x0s.shape[0]), "solver": name}
    try:
        solve = batched(solvers.JAX_SOLVES[name](problem.fn, max_steps), form)
        compiled, row["compile_s"] = compile_jit(solve, x0s, problem.args)

        def call():
            return compiled(x0s, problem.args)

        first, out = solvers.wall(call)
        return row, call, first, out
    except Exception as e:  # a peer failing is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
        return row, None, None, None


def time_turns(calls, firsts, rounds, min_seconds):
    """`(wall, CPU, runs)`: median seconds per call over `rounds` rounds that run each
    call in turn, or for a call whose first run took over `SLOW_S`, that run alone (its
    CPU seconds are not known: NaN)."""
    slow = [t > SLOW_S for t in firsts]
    counts = [
        1 if s else min(MAX_REPEATS, max(rounds, int(np.ceil(min_seconds / t))))
        for s, t in zip(slow, firsts)
    ]
    block = [max(1, -(-c // rounds)) for c in counts]
    wall = [[t] if s else [] for s, t in zip(slow, firsts)]
    cpu = [[float("nan")] if s else [] for s in slow]
    while any(len(w) < c for w, c in zip(wall, counts)):
        for i, call in enumerate(calls):
            for _ in range(min(block[i], counts[i] - len(wall[i]))):
                c0 = time.process_time()
                seconds, _ = solvers.wall(call)
                cpu[i].append(time.process_time() - c0)
                wall[i].append(seconds)
    return [(float(np.median(w)), float(np.median(c)), len(w)) for w, c in zip(wall, cpu)]


def finish(problem, grad, row, out):
    """`row` with the starts that converged, by `grad` (the batched gradient), and counts."""
    x = jnp.asarray(out["x"], problem.x0.dtype)
    g = np.asarray(grad(x, problem.args)).reshape(x.shape[0], -1)
    g_inf = np.max(np.abs(g), axis=1)
    row.update(
        converged=int(np.sum(np.isfinite(g_inf) & (g_inf <= solvers.GTOL))),
        evals=int(np.sum(out["evals"])),
        iters_max=int(np.max(out["iters"])),
        error=None,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=tuple(MAX_STEPS), default="full")
    parser.add_argument("--form", choices=FORMS, default="vmap")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--max-n", type=int, default=50)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--problems", default=None, help="comma-separated names to keep")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    setup()
    names = opts.solvers.split(",")
    keep = set(opts.problems.split(",")) if opts.problems else None
    kind = "many_small" if opts.form == "vmap" else f"many_small-{opts.form}"
    out_path = opts.out or RESULTS_DIR / f"{kind}-{opts.mode}.json"
    jax.jit(lambda a: a + 1).lower(1.0).compile()  # JAX's one-off start-up, untimed
    rows = []
    payload = {
        "command": "python -m benchmarks.many_small"
        + (f" --mode {opts.mode}" if opts.mode != "full" else "")
        + (f" --form {opts.form}" if opts.form != "vmap" else "")
        + (f" --tasks {opts.tasks}" if opts.tasks != 64 else "")
        + (f" --max-n {opts.max_n}" if opts.max_n != 50 else "")
        + (f" --solvers {opts.solvers}" if names != list(SOLVERS) else "")
        + (f" --problems {opts.problems}" if opts.problems else ""),
        "settings": {
            "form": opts.form,
            "tasks": opts.tasks,
            "max_n": opts.max_n,
            "gtol": solvers.GTOL,
            "history": solvers.HISTORY,
            "max_steps": MAX_STEPS[opts.mode],
            "rounds": ROUNDS[opts.mode],
            "min_seconds": MIN_SECONDS[opts.mode],
            "slow_s": SLOW_S,
        },
        "machine": machine(),
        "rows": rows,
    }
    t_start = time.perf_counter()
    for load in _loaders(opts.mode, keep):
        problem = load()
        if problem.n > opts.max_n or (keep is not None and problem.name not in keep):
            continue
        x0s = starts(problem, opts.tasks)
        prepared = [prepare(problem, name, x0s, MAX_STEPS[opts.mode], opts.form) for name in names]
        live = [p for p in prepared if p[1] is not None]
        timed = time_turns(
            [p[1] for p in live], [p[2] for p in live], ROUNDS[opts.mode], MIN_SECONDS[opts.mode]
        )
        grad = jax.jit(jax.vmap(jax.grad(problem.fn), in_axes=(0, None)))
        for (row, _, _, out), (wall, cpu, count) in zip(live, timed):
            row.update(run_s=wall, run_cpu_s=cpu, repeats=count)
            finish(problem, grad, row, out)
        for row, *_ in prepared:
            rows.append(row)
            print(
                f"{problem.name:22s} n={problem.n:<4d} {row['solver']:15s} "
                + (
                    f"compile {row['compile_s']:6.2f}s batch {row['run_s'] * 1e3:10.2f}ms "
                    f"converged {row['converged']:3d}/{opts.tasks} evals {row['evals']:7d}"
                    if row.get("error") is None
                    else row["error"][:120]
                ),
                flush=True,
            )
        payload["wall_s"] = time.perf_counter() - t_start
        write_json(out_path, payload)
    return payload


if __name__ == "__main__":
    main()
