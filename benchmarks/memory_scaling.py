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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized sweep")
    parser.add_argument("--case", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(*args.case)))
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
