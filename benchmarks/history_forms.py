"""Two-loop recursion against the compact form of H_k, by problem size (float64, CPU).

    python -m benchmarks.history_forms [--sizes 2,4,8,16,32,64,128,256,1000,4000] [--repeats 5]
        [--out benchmarks/results/history_forms.json]

For extended Rosenbrock at each n, solves with each form of the L-BFGS inverse-Hessian
product (`lbfgs_implicit._history`) and reports the time per solve, measured as 100
solves inside one jitted `fori_loop` (so per-call dispatch does not hide the
difference), best of `--repeats`, ending each with `jax.block_until_ready`. Each form
runs in its own subprocess, because the form is chosen when the solve is traced. This is
the measurement behind `COMPACT_MIN_SIZE`. The two forms round differently, so a solve
can take a different number of iterations with each: the rows (written to `--out` as
JSON) hold both counts and the ratio per iteration as well as per solve.
"""

import argparse
import json
import subprocess
import sys
import time

from ._common import RESULTS_DIR, write_results


SOLVES_PER_CALL = 100


def _measure(form: str, sizes: list[int], repeats: int) -> dict[int, tuple[float, int]]:
    """Seconds per solve and the solve's iteration count, by size."""
    import jax
    import jax.numpy as jnp

    import lbfgs_implicit as li
    import lbfgs_implicit._history as history

    from . import problems
    from ._common import setup

    setup()
    history.COMPACT_MIN_SIZE = 0 if form == "compact" else 2**62
    solver = li.LBFGS(gtol=1e-6, max_steps=5000)
    out = {}
    for n in sizes:
        prob = problems.rosenbrock(n)

        def many(x0, args, prob=prob):
            def body(i, acc):
                # `0 * acc` keeps XLA from hoisting the solve out of the loop.
                sol = li.optimize(prob.fn, x0 + 0.0 * acc, args, solver=solver, throw=False)
                return acc + 1e-30 * sol.stats["num_fun_evals"].astype(acc.dtype)

            return jax.lax.fori_loop(0, SOLVES_PER_CALL, body, jnp.zeros((), x0.dtype))

        sol = li.optimize(prob.fn, prob.x0, prob.args, solver=solver)
        if sol.state.history.compact != (form == "compact"):
            raise RuntimeError(f"asked for the {form} form at n={n}, the solve used the other")
        f = jax.jit(many)
        jax.block_until_ready(f(prob.x0, prob.args))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(prob.x0, prob.args))
            best = min(best, time.perf_counter() - t)
        out[n] = (best / SOLVES_PER_CALL, int(sol.stats["num_steps"]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="2,4,8,16,32,64,128,256,1000,4000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR / "history_forms.json"))
    parser.add_argument("--form", choices=("compact", "two-loop"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    sizes = [int(s) for s in opts.sizes.split(",")]
    if opts.form:  # the child process: print one JSON line
        print(json.dumps(_measure(opts.form, sizes, opts.repeats)))
        return
    times = {}
    for form in ("two-loop", "compact"):
        cmd = [sys.executable, "-m", "benchmarks.history_forms", "--form", form]
        cmd += ["--sizes", opts.sizes, "--repeats", str(opts.repeats)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times[form] = {int(k): tuple(v) for k, v in json.loads(line.splitlines()[-1]).items()}
    print("extended Rosenbrock, ms per solve (in-jit), and two-loop / compact")
    rows = []
    for n in sizes:
        (a, sa), (b, sb) = times["two-loop"][n], times["compact"][n]
        a, b = 1e3 * a, 1e3 * b
        # The two forms round differently, so a solve may take a different number of steps.
        rows.append(
            {
                "n": n,
                "two_loop_ms": a,
                "compact_ms": b,
                "two_loop_over_compact": a / b,
                "two_loop_steps": sa,
                "compact_steps": sb,
                "per_step_two_loop_over_compact": (a / sa) / (b / sb),
            }
        )
        print(
            f"  n={n:<6d} two-loop {a:7.3f}  compact {b:7.3f}  ratio {a / b:5.2f}"
            f"  steps {sa} / {sb}  per-step ratio {(a / sa) / (b / sb):5.2f}"
        )
    write_results(
        opts.out,
        "python -m benchmarks.history_forms",
        argv,
        rows,
        solves_per_call=SOLVES_PER_CALL,
        timing="best of --repeats calls, each of solves_per_call solves in one jitted loop",
    )


if __name__ == "__main__":
    main()
