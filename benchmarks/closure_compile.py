"""Compile time when `fn` closes over large arrays, against passing them through `args`.

`jax.jit` embeds arrays that a traced function closes over as constants of the compiled
program, so compile time grows with their size; arrays passed as arguments are not
constants. The problem is the one of `benchmarks.gpu_scaling` (two data vectors of length
n); each case compiles `jax.jit(jax.value_and_grad(outer))` in a fresh process and reports
trace + lower + compile seconds, also written to `--out` as JSON.

    python -m benchmarks.closure_compile [--sizes 100000,1000000,10000000]
        [--out benchmarks/results/closure_compile.json]
"""

import argparse
import json
import subprocess
import sys
import time

from ._common import RESULTS_DIR, write_results


def _child(n: int, closed: bool) -> float:
    import jax
    import jax.numpy as jnp

    import lbfgs_implicit as li

    jax.config.update("jax_enable_x64", True)
    jax.jit(lambda a: a + 1).lower(1.0).compile()  # JAX's one-off start-up, untimed
    a = jax.random.uniform(jax.random.PRNGKey(0), (n,), jnp.float64, 0.5, 5.0)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float64)
    theta = jnp.full(n, 0.3)

    def loss(x, theta, a, b):
        return jnp.sum(0.5 * a * x**2 + jnp.logaddexp(x - theta, -(x - theta)) - b * x)

    if closed:

        def inner(x, theta):
            return loss(x, theta, a, b)

        def outer(theta):
            return jnp.sum(li.optimize(inner, jnp.zeros(n), theta).params ** 2)

        call = (theta,)
    else:

        def inner(x, args):
            return loss(x, *args)

        def outer(theta, a, b):
            return jnp.sum(li.optimize(inner, jnp.zeros(n), (theta, a, b)).params ** 2)

        call = (theta, a, b)
    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(outer)).lower(*call).compile()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--out", default=str(RESULTS_DIR / "closure_compile.json"))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        print(json.dumps(_child(int(opts.child[0]), opts.child[1] == "closure")))
        return None
    rows = []
    for n in map(int, opts.sizes.split(",")):
        seconds = {}
        for how in ("args", "closure"):
            cmd = [sys.executable, "-m", "benchmarks.closure_compile", "--child", str(n), how]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            seconds[how] = json.loads(out.strip().splitlines()[-1])
        rows.append({"n": n, **seconds, "closure_over_args": seconds["closure"] / seconds["args"]})
        print(
            f"n={n:>9d}  compile with data in args {seconds['args']:6.2f} s, "
            f"closed over {seconds['closure']:6.2f} s "
            f"({seconds['closure'] / seconds['args']:.1f}x)",
            flush=True,
        )
    write_results(
        opts.out,
        "python -m benchmarks.closure_compile",
        argv,
        rows,
        timing="trace + lower + compile seconds of jax.jit(jax.value_and_grad(outer))",
    )
    return rows


if __name__ == "__main__":
    main()
