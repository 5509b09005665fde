"""Two trees of the package in one process: steady time per iteration, and the accuracy
of the memory's products, on whatever device JAX uses.

    git worktree add /tmp/base COMMIT
    python -m benchmarks.ab_trees --base /tmp/base [--n 1000000,10000000]
        [--shapes vector,matrix] [--dtypes float32] [--iters 5,15] [--rounds 7] [--out FILE]

The base tree's package is copied under the name `lbfgs_base` and imported beside this
tree's `lbfgs_implicit`, so both are compiled and timed in the same process, in
interleaved rounds: load that comes and goes hits both alike. The problem is
`benchmarks.scale`'s smoothing objective with the stopping tests off; the steady cost of
an iteration is `(t(K2) - t(K1)) / (iterations(K2) - iterations(K1))`, per round (wall
seconds, `jax.block_until_ready`), and the ratio is this tree's over the base's. The
evaluations each tree spent between K1 and K2 are reported beside it: a tree whose line
search needs more of them is slower for that reason, not its bookkeeping. Keep K2 below
the iteration that reaches the minimum (about 17 here): past it the line searches work on
rounding. The
products are `B'v` and `c'B` with a (10, 1e6) float32 `B`, by each tree's
`_history._project` and `combine_pairs`, against float64.
"""

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit

from . import scale
from ._common import machine, write_json


def _import_base(root):
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(Path(root) / "lbfgs_implicit", tmp / "lbfgs_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("lbfgs_base")


def products(packages):
    rng = np.random.default_rng(0)
    m, n = 10, 10**6
    b, v, c = rng.normal(size=(m, n)), rng.normal(size=n), rng.normal(size=m)
    ref_p, ref_c = b @ v, c @ b
    b32, v32, c32 = (jnp.asarray(t, jnp.float32) for t in (b, v, c))
    rows = {}
    for name, li in packages.items():
        hist = importlib.import_module(li.__name__ + "._history")
        h = hist.History(
            s=b32, y=b32, sy=None, yy=None, gamma=None, head=None, count=None, compact=True
        )
        p = jax.jit(lambda b, v: hist._project(b, v, jnp.float32))(b32, v32)
        # `h` as an argument: closed over, its 40 MB would become a program constant.
        q = jax.jit(lambda h, c, z: hist.combine_pairs(h, z, c, jnp.zeros_like(c)))(
            h, c32, jnp.zeros(n, jnp.float32)
        )
        rows[name] = {
            "project_rel_err": float(np.max(np.abs(np.asarray(p, np.float64) - ref_p)))
            / float(np.max(np.abs(ref_p))),
            "combine_rel_err": float(np.max(np.abs(np.asarray(q, np.float64) - ref_c)))
            / float(np.max(np.abs(ref_c))),
        }
        print(
            f"float32 products, m={m} n={n}, {name}: B'v max rel. error "
            f"{rows[name]['project_rel_err']:.1e}, c'B {rows[name]['combine_rel_err']:.1e}",
            flush=True,
        )
    return rows


def _solve(li, fn, iters):
    solver = li.LBFGS(history_size=10, max_steps=iters, gtol=0.0)

    def solve(x0, args):
        sol = li.optimize(fn, x0, args, solver=solver, throw=False)
        return sol.params, sol.stats["num_steps"], sol.stats["num_fun_evals"]

    return solve


def per_iteration(packages, n, shape, dtype, rounds, k1=5, k2=15):
    fn, x0, args = scale._problem(n, shape, dtype)
    compiled, iters, evals = {}, {}, {}
    for name, li in packages.items():
        for k in (k1, k2):
            c = jax.jit(_solve(li, fn, k)).lower(x0, args).compile()
            compiled[name, k] = c
            _, steps, count = jax.block_until_ready(c(x0, args))
            iters[name, k], evals[name, k] = int(steps), int(count)
        if iters[name, k2] <= iters[name, k1]:
            raise ValueError(
                f"{name}'s solve stopped at iteration {iters[name, k2]}, not after {k1}: "
                "choose a smaller --iters window"
            )
    times = {key: [] for key in compiled}
    for _ in range(rounds):
        for key, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(x0, args))
            times[key].append(time.perf_counter() - t0)
    steady = {
        name: [
            (t2 - t1) / (iters[name, k2] - iters[name, k1])
            for t1, t2 in zip(times[name, k1], times[name, k2])
        ]
        for name in packages
    }
    ratios = [a / b for a, b in zip(steady["this"], steady["base"])]
    row = {
        "n": n,
        "shape": shape,
        "dtype": dtype,
        "base_ms": 1e3 * statistics.median(steady["base"]),
        "this_ms": 1e3 * statistics.median(steady["this"]),
        "this_over_base_median": statistics.median(ratios),
        "this_over_base_range": [min(ratios), max(ratios)],
        "iterations": [k1, k2],
        "base_evals": evals["base", k2] - evals["base", k1],
        "this_evals": evals["this", k2] - evals["this", k1],
    }
    print(
        f"n={n} {shape} {dtype}: base {row['base_ms']:.3f} ms/iter, this "
        f"{row['this_ms']:.3f} ms/iter, this/base {row['this_over_base_median']:.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f} over {rounds} rounds); evaluations in "
        f"iterations {k1}-{k2}: base {row['base_evals']}, this {row['this_evals']}",
        flush=True,
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="root of the other tree")
    parser.add_argument("--n", default="1000000,10000000")
    parser.add_argument("--shapes", default="vector,matrix")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--iters", default="5,15", help="K1,K2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="a JSON results file")
    opts = parser.parse_args(argv)
    k1, k2 = map(int, opts.iters.split(","))
    jax.config.update("jax_enable_x64", True)
    packages = {"base": _import_base(opts.base), "this": lbfgs_implicit}
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    out = {
        "command": "python -m benchmarks.ab_trees " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "products": products(packages),
        "cases": [
            per_iteration(packages, n, shape, dtype, opts.rounds, k1, k2)
            for n in map(int, opts.n.split(","))
            for shape in opts.shapes.split(",")
            for dtype in opts.dtypes.split(",")
        ],
    }
    if opts.out:
        write_json(opts.out, out)


if __name__ == "__main__":
    main()
