"""Two-loop recursion against the compact form of H_k, by problem size (float64, CPU).

    python -m benchmarks.history_forms [--sizes 16,32,64,128,256,1000] [--repeats 5]

For extended Rosenbrock at each n, solves with each form of the L-BFGS inverse-Hessian
product (`lbfgs_implicit._history`) and reports the time per solve, measured as 100
solves inside one jitted `fori_loop` (so per-call dispatch does not hide the
difference), best of `--repeats`, ending each with `jax.block_until_ready`. Each form
runs in its own subprocess, because the form is chosen when the solve is traced. This is
the measurement behind `COMPACT_MIN_SIZE`.
"""

import argparse
import json
import subprocess
import sys
import time


SOLVES_PER_CALL = 100


def _measure(form: str, sizes: list[int], repeats: int) -> dict[int, float]:
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

        used = li.optimize(prob.fn, prob.x0, prob.args, solver=solver).state.history.compact
        if used != (form == "compact"):
            raise RuntimeError(f"asked for the {form} form at n={n}, the solve used the other")
        f = jax.jit(many)
        jax.block_until_ready(f(prob.x0, prob.args))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(prob.x0, prob.args))
            best = min(best, time.perf_counter() - t)
        out[n] = best / SOLVES_PER_CALL
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="16,32,64,128,256,1000")
    parser.add_argument("--repeats", type=int, default=5)
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
        times[form] = {int(k): v for k, v in json.loads(line.splitlines()[-1]).items()}
    print("extended Rosenbrock, ms per solve (in-jit), and two-loop / compact")
    for n in sizes:
        a, b = times["two-loop"][n] * 1e3, times["compact"][n] * 1e3
        print(f"  n={n:<6d} two-loop {a:7.3f}  compact {b:7.3f}  ratio {a / b:5.2f}")


if __name__ == "__main__":
    main()
