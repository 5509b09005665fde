"""Hypergradient time against the inner dimension on whatever device JAX uses (GPU if any).

The inner problem is separable and not quadratic,
`f(x, theta) = sum(a x^2 / 2 + log(2 cosh(x - theta)) - b x)`, with `n` parameters and
`n` hyperparameters; the outer loss is `|x*(theta)|^2`. For each dtype and n it reports
the warm median of the forward solve alone and of `jax.value_and_grad` of the outer loss
(both jitted, `jax.block_until_ready`), compile times apart, and the relative error of
the directional derivative along a random direction: in float64 against central
differences of solves to `gtol` 1e-12 (differences of solves to the timed 1e-9 carry
about that much error themselves); in float32 against the float64 hypergradient of the
same data (central differences of a float32 solve carry 1e-3 to 1e-2 of rounding at these
sizes, more than the error they would measure).

    python -m benchmarks.gpu_scaling [--max-n 10000000] [--out FILE]
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import lbfgs_implicit as li


jax.config.update("jax_enable_x64", True)


def _time(fn, *args, reps=5):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t)
    warm = statistics.median(runs)
    return first - warm, warm, out


def _inner(x, args):
    theta, a, b = args
    return jnp.sum(0.5 * a * x**2 + jnp.logaddexp(x - theta, -(x - theta)) - b * x)


def _outer(n, dtype, gtol=None):
    if gtol is None:
        gtol = 1e-9 if dtype == jnp.float64 else 1e-4

    # Data passed as arguments, not closed over: jit would embed closed-over arrays as
    # constants, and compile time would grow with n.
    def outer(theta, a, b):
        solver = li.LBFGS(gtol=gtol)
        sol = li.optimize(_inner, jnp.zeros(n, dtype), (theta, a, b), solver=solver)
        return jnp.sum(sol.params**2)

    return outer


def case(n, dtype):
    a = jax.random.uniform(jax.random.PRNGKey(0), (n,), dtype, 0.5, 5.0)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,), dtype)
    outer = _outer(n, dtype)
    theta = jnp.full(n, 0.3, dtype)
    forward = jax.jit(outer)
    both = jax.jit(jax.value_and_grad(outer))
    c_fwd, t_fwd, _ = _time(forward, theta, a, b)
    c_both, t_both, (_, g) = _time(both, theta, a, b)
    d = jax.random.normal(jax.random.PRNGKey(3), (n,), dtype)
    reference_gtol = None
    if dtype == jnp.float64:
        # Tighter than the timed solves: differences of solves to gtol carry about gtol of
        # error of their own, more than the hypergradient's at large n.
        eps, reference_gtol = 1e-4, 1e-12
        tight = jax.jit(_outer(n, dtype, reference_gtol))
        ref = (tight(theta + eps * d, a, b) - tight(theta - eps * d, a, b)) / (2 * eps)
        reference = "central differences"
    else:
        wide = [v.astype(jnp.float64) for v in (theta, a, b, d)]
        _, g64 = jax.jit(jax.value_and_grad(_outer(n, jnp.float64)))(*wide[:3])
        ref = g64 @ wide[3]
        reference = "float64 hypergradient"
    derivative = float(g.astype(jnp.float64) @ d.astype(jnp.float64))
    return {
        "dtype": jnp.dtype(dtype).name,
        "n": n,
        "forward_ms": t_fwd * 1e3,
        "value_and_grad_ms": t_both * 1e3,
        "backward_share": (t_both - t_fwd) / t_both,
        "compile_forward_s": c_fwd,
        "compile_value_and_grad_s": c_both,
        "directional_derivative_rel_err": abs(derivative - float(ref)) / abs(float(ref)),
        "reference": reference,
        "reference_gtol": reference_gtol,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-n", type=int, default=10**7)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}")
    rows = []
    for dtype in (jnp.float64, jnp.float32):
        n = 1000
        while n <= opts.max_n:
            row = case(n, dtype)
            rows.append(row)
            print(
                f"{row['dtype']} n={n:>9}: forward {row['forward_ms']:8.2f} ms, "
                f"value_and_grad {row['value_and_grad_ms']:8.2f} ms "
                f"(backward share {row['backward_share']:.2f}), compile "
                f"{row['compile_forward_s']:.2f} s / {row['compile_value_and_grad_s']:.2f} s, "
                f"directional derivative's rel. error {row['directional_derivative_rel_err']:.1e} "
                f"(against {row['reference']})",
                flush=True,
            )
            n *= 10
    if opts.out:
        with open(opts.out, "w") as f:
            command = "python -m benchmarks.gpu_scaling " + " ".join(argv or sys.argv[1:])
            payload = {"command": command, "device": device.device_kind, "jax": jax.__version__}
            json.dump({**payload, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
