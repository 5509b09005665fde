"""What a `vmap`-ed batch of solves pays, against what its tasks need.

iMAML sinusoid regression: each task's inner problem is an MLP's support loss plus
`lam/2 ||phi - w_meta||^2`. Under `jax.vmap` the solver's loop (and the line search
nested in it) runs every task until the slowest is done, so the batch pays for more
objective evaluations than its tasks' own `num_fun_evals`.

Reported per batch size `T`:
- `lane_evals`: objective evaluations the forward solves of the batch pay, counted on the
  host once per task and evaluation (finished tasks' wasted ones included), against
  `own_evals`, the sum of the tasks' own counts; deterministic, whatever the load;
- `steps_mean`, `steps_max`: per-task iterations;
- with `--time`: median seconds of the compiled `value_and_grad` of the mean query loss,
  on the mixed batch and on `T` copies of its slowest task, interleaved over rounds.

    python -m benchmarks.batching --tasks 16 64 --dtype float64 --width 20 [--time]
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._common import block, RESULTS_DIR, write_json


SHOTS = 10
_CALLS = [0]


def _mlp_init(key, sizes, dtype):
    params = []
    for k, (m, n) in zip(jr.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        w = jr.normal(k, (m, n), dtype) * np.sqrt(1.0 / m).astype(dtype)
        params.append({"w": w, "b": jnp.zeros(n, dtype)})
    return params


def _mlp(params, x):
    h = x[:, None]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return (h @ params[-1]["w"] + params[-1]["b"])[:, 0]


def _tasks(key, num, dtype):
    ka, kp, kx = jr.split(key, 3)
    amp = jr.uniform(ka, (num, 1), dtype, 0.1, 5.0)
    phase = jr.uniform(kp, (num, 1), dtype, 0.0, np.pi)
    x = jr.uniform(kx, (num, 2 * SHOTS), dtype, -5.0, 5.0)
    y = amp * jnp.sin(x + phase)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


def _inner(phi, args):
    w_meta, xs, ys, lam = args
    fit = jnp.mean((_mlp(phi, xs) - ys) ** 2)
    prox = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(w_meta)))
    return fit + 0.5 * lam * prox


def _counted_inner(phi, args):
    # One host call per task and evaluation: a batched call reaches the host once per
    # element, so the count is the work the batch pays, independent of the machine.
    jax.debug.callback(lambda *_: _CALLS.__setitem__(0, _CALLS[0] + 1), phi[0]["b"])
    return _inner(phi, args)


def count(li, w_meta, xs, ys, lam):
    run = jax.jit(
        jax.vmap(
            lambda w, x, y: li.optimize(_counted_inner, w, (w, x, y, lam), throw=False),
            in_axes=(None, 0, 0),
        )
    )
    _CALLS[0] = 0
    sols = block(run(w_meta, xs, ys))
    jax.effects_barrier()
    steps = np.asarray(sols.stats["num_steps"])
    return {
        "lane_evals": _CALLS[0],
        "own_evals": int(jnp.sum(sols.stats["num_fun_evals"])),
        "steps_mean": float(steps.mean()),
        "steps_max": int(steps.max()),
        "slowest": int(np.argmax(steps)),
    }


def timing(li, w_meta, data, slowest, lam, rounds):
    def outer(w_meta, xs, ys, xq, yq):
        sols = jax.vmap(
            lambda w, x, y: li.optimize(_inner, w, (w, x, y, lam), throw=False),
            in_axes=(None, 0, 0),
        )(w_meta, xs, ys)
        return jnp.mean((jax.vmap(_mlp)(sols.params, xq) - yq) ** 2)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(outer)).lower(w_meta, *data).compile()
    compile_s = time.perf_counter() - t0
    copies = tuple(jnp.broadcast_to(a[slowest], a.shape) for a in data)
    times = {"mixed": [], "slowest": []}
    for _ in range(rounds):
        for name, batch in (("mixed", data), ("slowest", copies)):
            block(compiled(w_meta, *batch))
            t0 = time.perf_counter()
            block(compiled(w_meta, *batch))
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"compile_s": compile_s, "mixed_s": med["mixed"], "slowest_s": med["slowest"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--time", action="store_true", help="also time value_and_grad")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON to results/OUT")
    opts = parser.parse_args(argv)
    if opts.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import lbfgs_implicit as li

    dtype = jnp.dtype(opts.dtype)
    lam = jnp.asarray(1.0, dtype)
    w_meta = _mlp_init(jr.PRNGKey(0), (1, opts.width, opts.width, 1), dtype)
    rows = []
    for num in opts.tasks:
        data = _tasks(jr.PRNGKey(num), num, dtype)
        row = {"tasks": num, "dtype": opts.dtype, "width": opts.width}
        row.update(count(li, w_meta, data[0], data[1], lam))
        row["waste"] = row["lane_evals"] / row["own_evals"]
        if opts.time:
            row.update(timing(li, w_meta, data, row["slowest"], lam, opts.rounds))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if opts.out:
        write_json(RESULTS_DIR / opts.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
