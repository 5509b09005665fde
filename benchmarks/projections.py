"""`(B'v, B'w)` as two matrix-vector products against one product with two columns.

`lbfgs_implicit._history._project2` projects two vectors on a memory buffer `B`
(`m x n`) as two matrix-vector products; the alternative reads `B` once, as a product
with `v` and `w` stacked as the two columns of an `n x 2` matrix. This times both,
float64, as `--inner` projections inside one jitted `fori_loop` (so per-call dispatch
does not hide the difference), the two taking turns over `--rounds` rounds; the time per
projection and the median ratio stacked / two products per size. Written to `--out`.

    python -m benchmarks.projections [--sizes 1000,4000,100000] [--m 10] [--rounds 15]
        [--out benchmarks/results/projections.json]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from lbfgs_implicit._history import _project2
from lbfgs_implicit._misc import EXACT

from ._common import RESULTS_DIR, setup, write_results


def _stacked(buf, v, w):
    vw = jnp.stack([v, w], axis=-1)
    both = jnp.tensordot(buf, vw, axes=1, preferred_element_type=buf.dtype, precision=EXACT)
    return both[:, 0], both[:, 1]


def _two(buf, v, w):
    return _project2(buf, v, w, buf.dtype)


def _looped(project, inner):
    def run(buf, v, w):
        def body(i, acc):
            # `0 * acc` keeps XLA from hoisting the product out of the loop.
            a, b = project(buf, v + 0.0 * acc, w + 0.0 * acc)
            return acc + 1e-30 * (a[0] + b[0])

        return jax.lax.fori_loop(0, inner, body, jnp.zeros((), v.dtype))

    return jax.jit(run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,4000,100000")
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS_DIR / "projections.json"))
    opts = parser.parse_args(argv)
    setup()
    rows = []
    for n in map(int, opts.sizes.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        buf = jax.random.normal(keys[0], (opts.m, n))
        v, w = jax.random.normal(keys[1], (n,)), jax.random.normal(keys[2], (n,))
        ref, got = jax.jit(_two)(buf, v, w), jax.jit(_stacked)(buf, v, w)
        assert all(jnp.allclose(a, b) for a, b in zip(ref, got))
        fns = {"two": _looped(_two, opts.inner), "stacked": _looped(_stacked, opts.inner)}
        for fn in fns.values():
            jax.block_until_ready(fn(buf, v, w))
        seconds = {name: [] for name in fns}
        for _ in range(opts.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(buf, v, w))
                seconds[name].append((time.perf_counter() - t0) / opts.inner)
        ratios = [a / b for a, b in zip(seconds["stacked"], seconds["two"])]
        row = {
            "n": n,
            "m": opts.m,
            "two_us": 1e6 * statistics.median(seconds["two"]),
            "stacked_us": 1e6 * statistics.median(seconds["stacked"]),
            "stacked_over_two_median": statistics.median(ratios),
            "stacked_over_two_min": min(ratios),
            "stacked_over_two_max": max(ratios),
        }
        rows.append(row)
        print(
            f"n={n:8d} two products {row['two_us']:9.2f} us  stacked {row['stacked_us']:9.2f} us"
            f"  stacked / two {row['stacked_over_two_median']:.2f}"
            f" ({row['stacked_over_two_min']:.2f}-{row['stacked_over_two_max']:.2f})",
            flush=True,
        )
    write_results(
        opts.out,
        "python -m benchmarks.projections",
        argv,
        rows,
        timing="wall seconds per projection, --inner in one jitted loop, median over rounds",
    )


if __name__ == "__main__":
    main()
