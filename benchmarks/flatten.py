"""Time per solve with the leaves solved as one vector and per leaf, by size.

`optimize` concatenates several leaves of one dtype into one vector (fewer operations
to compile and launch) up to `lbfgs_implicit._flat.FLAT_MAX_SIZE` parameters; beyond
that the concatenation and slicing on every evaluation cost more than they save. This
measures both programs (`_optimize._FLATTEN` on, at any size, and off while tracing)
on a six-leaf MLP with an elementwise objective, the case where that copying weighs
most: 10 iterations with the stopping test off, CPU seconds of the process per solve,
the two taking turns over `--rounds` rounds; the median ratio flat / per-leaf. It also
records XLA's temporaries (`memory_analysis`, deterministic) of both programs for the
four-leaf MLP of `tests/test_memory.py` at `history_size=4`, forward and
value-and-gradient, in parameter-sized vectors, and those of the value-and-gradient
(flat) with `ImplicitAdjoint(all_pairs=True)`.

    python -m benchmarks.flatten [--widths 20,70,220,700] [--rounds 5]
        [--out benchmarks/results/flatten.json]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import lbfgs_implicit as li
from lbfgs_implicit import _flat, _optimize

from ._common import RESULTS_DIR, setup, write_results


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


def _traced(flatten, fn, *args):
    """`jax.jit(fn)` compiled for `args` with flattening forced on at any size, or off."""
    limit = _flat.FLAT_MAX_SIZE
    _optimize._FLATTEN, _flat.FLAT_MAX_SIZE = flatten, 2**62
    try:
        return jax.jit(fn).lower(*args).compile()
    finally:
        _optimize._FLATTEN, _flat.FLAT_MAX_SIZE = True, limit


def _temporaries(history_size=4):
    """Temporaries / parameter bytes of `tests/test_memory.py`'s MLP solve, both ways."""
    x0 = {
        "w1": jnp.zeros((60, 100)),
        "b1": jnp.zeros(100),
        "w2": jnp.zeros((100, 60)),
        "b2": jnp.zeros(60),
    }
    n_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(x0))
    solver = li.LBFGS(history_size=history_size, max_steps=15)

    def programs(adjoint=li.ImplicitAdjoint()):
        def objective(x, t):  # a new function per program: nothing from a cache
            leaves = jtu.tree_leaves(x)
            return sum(jnp.sum(jax.nn.softplus(-leaf) + 0.5 * t * leaf**2) for leaf in leaves)

        def solve(t, x0):
            return li.optimize(objective, x0, t, solver=solver, adjoint=adjoint, throw=False).params

        def value_and_grad(t, x0):
            def loss(t):
                return sum(jnp.sum(p) for p in jtu.tree_leaves(solve(t, x0)))

            return jax.value_and_grad(loss)(t)

        return {"forward": solve, "value_and_grad": value_and_grad}

    out = {"n": n_bytes // 8, "history_size": history_size}
    for name in ("forward", "value_and_grad"):
        for flatten in (True, False):
            compiled = _traced(flatten, programs()[name], jnp.asarray(1.5), x0)
            temp = compiled.memory_analysis().temp_size_in_bytes
            out[f"{name}_{'flat' if flatten else 'per_leaf'}_vectors"] = temp / n_bytes
    program = programs(li.ImplicitAdjoint(all_pairs=True))["value_and_grad"]
    temp = _traced(True, program, jnp.asarray(1.5), x0).memory_analysis().temp_size_in_bytes
    out["value_and_grad_flat_all_pairs_vectors"] = temp / n_bytes
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="20,70,220,700")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR / "flatten.json"))
    opts = parser.parse_args(argv)
    setup()
    temporaries = _temporaries()
    print("temporaries, parameter-sized vectors:", temporaries, flush=True)
    rows = []
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
        ratios = [a / b for a, b in zip(seconds[True], seconds[False])]
        rows.append(
            {
                "n": n,
                "width": h,
                "flat_cpu_ms": 1e3 * flat,
                "per_leaf_cpu_ms": 1e3 * per_leaf,
                "flat_over_per_leaf": flat / per_leaf,
                "per_round_ratio_min": min(ratios),
                "per_round_ratio_max": max(ratios),
            }
        )
        print(
            f"n={n:8d} flat {1e3 * flat:9.3f} ms  per-leaf {1e3 * per_leaf:9.3f} ms  "
            f"flat / per-leaf {flat / per_leaf:.2f}",
            flush=True,
        )
    write_results(
        opts.out,
        "python -m benchmarks.flatten",
        argv,
        rows,
        timing="CPU seconds of the process per solve (10 iterations), median over rounds",
        temporaries=temporaries,
    )


if __name__ == "__main__":
    main()
