"""What `throw=True` costs per call of a jitted program, against `throw=False`.

    python -m benchmarks.throw_cost [--rounds 7] [--calls 200] [--sync-dispatch] [--out PATH]

Inside `jax.jit`, `throw=True` puts a host callback in the program (taken only when a
solve fails). JAX runs a program that holds a host callback through its Python dispatch
path instead of the C++ one, whatever the callback does, so every call pays a fixed
cost. This script measures that cost on three problem sizes and three calls (a jitted
solve, a jitted value_and_grad of an outer loss, and the same under `vmap` over 8
problems). The variants run interleaved, `calls` calls per round each, and the
per-call CPU time (`time.process_time`) and wall time are the medians over rounds
(and the CPU time's minimum);
every call ends in `jax.block_until_ready`. Compile time is reported apart.
`--sync-dispatch` turns `jax_cpu_enable_async_dispatch` off, so that every program runs
on the calling thread.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import lbfgs_implicit as li

from ._common import block, machine, RESULTS_DIR, setup, write_json


def _rosenbrock(x, a):
    return (a - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def _ridge(rows, n, seed):
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(key_a, (rows, n)) / jnp.sqrt(n)
    b = jax.random.normal(key_b, (rows,))

    def fn(x, lam):
        return 0.5 * jnp.sum((a @ x - b) ** 2) + 0.5 * lam * jnp.sum(x**2)

    return fn


PROBLEMS = {
    # name: (objective, x0, theta, outer loss of the solution)
    "rosenbrock n=2": (_rosenbrock, jnp.array([-1.2, 1.0]), 1.0, lambda x: jnp.sum(x**2)),
    "ridge n=30": (_ridge(40, 30, 0), jnp.zeros(30), 0.5, lambda x: jnp.sum(x**2)),
    "ridge n=2000, 8 rows": (_ridge(8, 2000, 1), jnp.zeros(2000), 1.0, lambda x: jnp.sum(x**2)),
}


def _calls(fn, x0, outer, throw):
    def solve(theta):
        return li.optimize(fn, x0, theta, throw=throw).params

    def loss(theta):
        return outer(solve(theta))

    grad = jax.value_and_grad(loss)
    return {"solve": solve, "value_and_grad": grad, "vmap(value_and_grad), 8": jax.vmap(grad)}


def _per_call(compiled, arg, calls):
    block(compiled(arg))
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        out = compiled(arg)
        block(out)
    return (time.process_time() - c0) / calls, (time.perf_counter() - w0) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sync-dispatch", action="store_true")
    parser.add_argument("--out")
    opts = parser.parse_args(argv)
    setup()
    if opts.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    suffix = "-sync" if opts.sync_dispatch else ""
    out = opts.out or str(RESULTS_DIR / f"throw_cost{suffix}.json")
    rows = []
    for name, (fn, x0, theta, outer) in PROBLEMS.items():
        variants = {}
        for throw in (True, False):
            for call, f in _calls(fn, x0, outer, throw).items():
                arg = jnp.full((8,), theta) if call.startswith("vmap") else jnp.asarray(theta)
                t0 = time.perf_counter()
                compiled = jax.jit(f).lower(arg).compile()
                seconds = time.perf_counter() - t0
                callback = "callback" in compiled.as_text()
                variants[(call, throw)] = (compiled, arg, seconds, callback, [], [])
        for _ in range(opts.rounds):
            for compiled, arg, _, _, cpu, wall in variants.values():
                c, w = _per_call(compiled, arg, opts.calls)
                cpu.append(c)
                wall.append(w)
        for call in _calls(fn, x0, outer, True):
            row = {"problem": name, "call": call}
            for throw in (True, False):
                _, _, seconds, callback, cpu, wall = variants[(call, throw)]
                key = "throw" if throw else "no_throw"
                row[key] = {
                    "cpu_us": 1e6 * statistics.median(cpu),
                    "cpu_us_min": 1e6 * min(cpu),
                    "wall_us": 1e6 * statistics.median(wall),
                    "compile_s": seconds,
                    "host_callback_in_program": callback,
                }
            row["cpu_ratio"] = row["throw"]["cpu_us"] / row["no_throw"]["cpu_us"]
            row["extra_cpu_us"] = row["throw"]["cpu_us"] - row["no_throw"]["cpu_us"]
            rows.append(row)
            print(
                f"{name:22s} {call:26s} throw=True {row['throw']['cpu_us']:8.1f} us  "
                f"throw=False {row['no_throw']['cpu_us']:8.1f} us  "
                f"ratio {row['cpu_ratio']:.2f}  (+{row['extra_cpu_us']:.0f} us; compile "
                f"{row['throw']['compile_s']:.1f} / {row['no_throw']['compile_s']:.1f} s)",
                flush=True,
            )
    write_json(
        out,
        {
            "command": "python -m benchmarks.throw_cost "
            f"--rounds {opts.rounds} --calls {opts.calls}"
            + (" --sync-dispatch" if opts.sync_dispatch else ""),
            "sync_dispatch": opts.sync_dispatch,
            "machine": machine(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
