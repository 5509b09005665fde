"""Peak memory of forward + backward (solve and hypergradient) against n and history_size.

Not a test: a measurement. Each case runs in a fresh subprocess (peak RSS is a
high-water mark, so cases must not share a process) and reports

- `xla_bytes`: XLA's own accounting of the compiled program (arguments + outputs +
  temporaries, from `compiled.memory_analysis()`), deterministic and free of allocator
  noise;
- `rss_delta_bytes`: the process's peak RSS (`resource.getrusage`) after the case, minus
  the peak after compiling and running the same program at a tiny size, so the JAX
  runtime and the compiler's own memory cancel out.

The problem is a separable smooth convex objective with per-coordinate weights `theta`
(the hyperparameters), so the forward solve takes a fixed number of steps at every n.
A linear fit `bytes ~ a + b * n * (2 * history_size + c)` is what O(n * history_size)
predicts; the script prints the per-(n * history_size) slope for each sweep.

A third table, `temporaries_by_shape`, gives the compiled program's temporaries
(`temp_size_in_bytes`) in units of the parameters' bytes, for the same objective on
parameters of different shapes with the same n: one vector, one matrix, a 4-D
convolution kernel and a dict of MLP layers, in float32 and float64, for the forward
solve alone and for `value_and_grad` of the outer loss. The history alone is
`2 * history_size` of these units.

    python benchmarks/memory_scaling.py            # default sizes, a few minutes on CPU
    python benchmarks/memory_scaling.py --quick    # CI-sized

Writes `benchmarks/results/memory_scaling.json`.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys


HERE = pathlib.Path(__file__).resolve().parent


def _case(n: int, history_size: int, max_steps: int) -> dict:
    """Run inside the subprocess: one (n, history_size) case."""
    import resource

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import lbfgs_implicit as li

    def fn(x, theta):
        # Smooth, strictly convex, separable: softplus pulls x up, theta-weighted ridge.
        return jnp.sum(jax.nn.softplus(-x) + 0.5 * theta * x**2)

    solver = li.LBFGS(history_size=history_size, max_steps=max_steps, gtol=0.0)

    def outer(theta):
        sol = li.optimize(fn, jnp.zeros_like(theta), theta, solver=solver, throw=False)
        return jnp.sum(sol.params)

    step = jax.jit(jax.value_and_grad(outer))

    def peak_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    # Baseline: the same program at a tiny size, compiled and run.
    tiny = jnp.linspace(1.0, 2.0, 64)
    jax.block_until_ready(step(tiny))
    base = peak_rss()

    theta = jnp.linspace(1.0, 2.0, n)
    compiled = step.lower(theta).compile()
    analysis = compiled.memory_analysis()
    xla_bytes = int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    value, grad = jax.block_until_ready(compiled(theta))
    peak = peak_rss()
    return {
        "n": n,
        "history_size": history_size,
        "xla_bytes": xla_bytes,
        "xla_temp_bytes": int(analysis.temp_size_in_bytes),
        "rss_delta_bytes": peak - base,
        "finite": bool(jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))),
    }


SHAPES = {
    # About 1e5 parameters each.
    "vector": {"x": (100_000,)},
    "matrix": {"x": (400, 250)},
    "conv4d": {"x": (3, 3, 96, 116)},
    "mlp": {"w1": (200, 250), "b1": (250,), "w2": (250, 200), "b2": (200,)},
}


def _shape_case(shape: str, dtype: str, history_size: int) -> dict:
    """Run inside the subprocess: temporaries of one leaf layout, forward and gradient."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jax.tree_util as jtu

    import lbfgs_implicit as li

    x0 = {k: jnp.zeros(v, dtype) for k, v in SHAPES[shape].items()}
    n_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(x0))

    def fn(x, theta):
        return sum(jnp.sum(jax.nn.softplus(-v) + 0.5 * theta * v**2) for v in jtu.tree_leaves(x))

    solver = li.LBFGS(history_size=history_size, max_steps=15, gtol=0.0)

    def solve(theta):
        return li.optimize(fn, x0, theta, solver=solver, throw=False).params

    def outer(theta):
        return sum(jnp.sum(v) for v in jtu.tree_leaves(solve(theta)))

    theta = jnp.asarray(1.5, dtype)
    row = {"shape": shape, "dtype": dtype, "history_size": history_size, "n_bytes": n_bytes}
    for name, program in (("forward", solve), ("value_and_grad", jax.value_and_grad(outer))):
        analysis = jax.jit(program).lower(theta).compile().memory_analysis()
        row[name] = analysis.temp_size_in_bytes / n_bytes
    return row


def _run_case(n: int, history_size: int, max_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--case", str(n), str(history_size), str(max_steps)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(rows: list[dict], key: str, x_of) -> tuple[float, float]:
    """Least-squares line `key ~ a + b * x` and its R^2."""
    import numpy as np

    x = np.array([x_of(r) for r in rows], float)
    y = np.array([r[key] for r in rows], float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    return float(b), 1.0 - ss_res / ss_tot


def _shapes_table() -> list[dict]:
    rows = []
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for shape in SHAPES:
        for dtype in ("float32", "float64"):
            for m in (10,):
                cmd = [sys.executable, __file__, "--shape-case", shape, dtype, str(m)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("Temporaries in units of the parameters' bytes (history alone: 2 * history_size)")
    print(f"{'shape':<8}{'dtype':>9}{'history':>9}{'forward':>9}{'value_and_grad':>16}")
    for r in rows:
        print(
            f"{r['shape']:<8}{r['dtype']:>9}{r['history_size']:>9}"
            f"{r['forward']:>9.1f}{r['value_and_grad']:>16.1f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized sweep")
    parser.add_argument("--case", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape-case", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--shapes-only", action="store_true", help="only the temporaries-by-shape table"
    )
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(*args.case)))
        return
    if args.shape_case:
        shape, dtype, m = args.shape_case
        print(json.dumps(_shape_case(shape, dtype, int(m))))
        return

    by_shape = _shapes_table()
    if args.shapes_only:
        path = HERE / "results" / "memory_by_shape.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"temporaries_by_shape": by_shape}, indent=2) + "\n")
        print(f"wrote {path}")
        return

    if args.quick:
        ns, fixed_m = [50_000, 100_000, 200_000], 10
        ms, fixed_n = [5, 10, 20], 100_000
    else:
        ns, fixed_m = [250_000, 500_000, 1_000_000, 2_000_000], 10
        ms, fixed_n = [5, 10, 20, 40], 500_000
    max_steps = 15

    sweep_n = [_run_case(n, fixed_m, max_steps) for n in ns]
    sweep_m = [_run_case(fixed_n, m, max_steps) for m in ms]

    print(f"{'sweep':<14}{'n':>10}{'history':>9}{'XLA MiB':>10}{'peak RSS MiB':>14}")
    for name, rows in (("n", sweep_n), ("history_size", sweep_m)):
        for r in rows:
            print(
                f"{name:<14}{r['n']:>10}{r['history_size']:>9}"
                f"{r['xla_bytes'] / 2**20:>10.1f}{r['rss_delta_bytes'] / 2**20:>14.1f}"
            )
    fits = {}
    for name, rows, x_of in (
        ("n", sweep_n, lambda r: r["n"]),
        ("history_size", sweep_m, lambda r: r["history_size"]),
    ):
        for key in ("xla_bytes", "rss_delta_bytes"):
            slope, r2 = _slope(rows, key, x_of)
            fits[f"{key} vs {name}"] = {"slope_bytes": slope, "r2": r2}
    print()
    for label, fit in fits.items():
        print(f"{label:<32} slope {fit['slope_bytes']:>14.1f} B/unit   R^2 {fit['r2']:.4f}")
    # Bytes per stored float64 pair entry: the history costs 2 * m * n * 8 bytes.
    per_pair = fits["xla_bytes vs history_size"]["slope_bytes"] / fixed_n
    print(f"XLA bytes per (history slot * parameter): {per_pair:.1f} (16 = one s and one y)")

    out = {
        "temporaries_by_shape": by_shape,
        "max_steps": max_steps,
        "sweep_n": sweep_n,
        "sweep_history_size": sweep_m,
        "fits": fits,
        "bytes_per_history_slot_per_parameter": per_pair,
    }
    path = HERE / "results" / "memory_scaling.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
