"""Time per solve with the leaves solved as one vector and per leaf, by size.

`optimize` concatenates several leaves of one dtype into one vector (fewer operations
to compile and launch) up to `lbfgs_implicit._flat.FLAT_MAX_SIZE` parameters; beyond
that the concatenation and slicing on every evaluation cost more than they save. This
measures both programs (`_optimize._FLATTEN` on, at any size, and off while tracing)
on a six-leaf MLP with an elementwise objective, the case where that copying weighs
most: 10 iterations with the stopping test off, CPU seconds of the process per solve,
the two taking turns over `--rounds` rounds; the median ratio flat / per-leaf.

    python -m benchmarks.flatten [--widths 20,70,220,700] [--rounds 5]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import lbfgs_implicit as li
from lbfgs_implicit import _flat, _optimize

from ._common import setup


def _mlp(h):
    return {
        "w1": jnp.zeros((h, h)),
        "b1": jnp.zeros(h),
        "w2": jnp.zeros((h, h)),
        "b2": jnp.zeros(h),
        "w3": jnp.zeros((h, 1)),
        "b3": jnp.zeros(1),
    }


def _program(flatten, x0):
    def objective(x, t):  # a new function per program: nothing from a cache
        return sum(
            jnp.sum(jax.nn.softplus(-leaf) + 0.5 * t * leaf**2 + 0.1 * jnp.sin(leaf))
            for leaf in jtu.tree_leaves(x)
        )

    solver = li.LBFGS(max_steps=10, gtol=0.0)
    solve = jax.jit(
        lambda t, x0: li.optimize(objective, x0, t, solver=solver, throw=False).stats["num_steps"]
    )
    # Traced here, with flattening forced on at any size or turned off.
    limit = _flat.FLAT_MAX_SIZE
    _optimize._FLATTEN, _flat.FLAT_MAX_SIZE = flatten, 2**62
    try:
        jax.block_until_ready(solve(jnp.asarray(1.5), x0))
    finally:
        _optimize._FLATTEN, _flat.FLAT_MAX_SIZE = True, limit
    return solve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="20,70,220,700")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)
    setup()
    for h in map(int, opts.widths.split(",")):
        x0 = _mlp(h)
        n = sum(leaf.size for leaf in jtu.tree_leaves(x0))
        programs = {flatten: _program(flatten, x0) for flatten in (True, False)}
        reps = max(1, 20_000 // n)
        seconds = {True: [], False: []}
        for _ in range(opts.rounds):
            for flatten, solve in programs.items():
                t0 = time.process_time()
                for _ in range(reps):
                    out = solve(jnp.asarray(1.5), x0)
                jax.block_until_ready(out)
                seconds[flatten].append((time.process_time() - t0) / reps)
        flat, per_leaf = statistics.median(seconds[True]), statistics.median(seconds[False])
        print(
            f"n={n:8d} flat {1e3 * flat:9.3f} ms  per-leaf {1e3 * per_leaf:9.3f} ms  "
            f"flat / per-leaf {flat / per_leaf:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
