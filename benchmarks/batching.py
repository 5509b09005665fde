"""What a `vmap`-ed batch of solves pays: solving by turns against plain `vmap`.

Two workloads:
- `imaml`: iMAML sinusoid regression; each task's inner problem is an MLP's support
  loss plus `lam/2 ||phi - w_meta||^2`, and the measured program is `value_and_grad` of
  the mean query loss over `T` tasks (forward solves and implicit backward passes);
- `multistart`: `T` starting points of one non-convex objective (a Styblinski-Tang-like
  sum of quartics coupled by a Rosenbrock term, n = 20), value and gradient of the sum
  of the minima's values with respect to the objective's data.

Modes, each compiled from a fresh function (`optimize` caches its trace per objective,
and the mode is read at trace time):
- `refill`: the batch solved by turns in the policy's number of lanes, each lane loading
  the next pending element when its own has finished (`lbfgs_implicit/_batching.py`),
  forced, and the backward CG in as many refilled lanes (`lbfgs_implicit/_cg.py`);
  `refill/D` in T/D lanes, `refill/D@W` also loading W lanes per pass (`--lanes D@W`);
- `refill-vmapcg`: `refill` with the backward CG under plain `vmap` (the backward of
  the library before it had lanes);
- `turns`: by turns in one lane per element (one evaluation per element per turn, steps
  finished as each element's line search ends), forced;
- `vmap`: plain `vmap` of the solver's loop and its nested line search, forced.
`auto` in the output says which form the library picks for that batch.

Reported per batch size `T` and mode:
- `lane_evals`: objective evaluations the forward solves pay, counted on the host once
  per element and evaluation (finished elements' wasted ones included), against
  `own_evals`, the sum of the elements' own `num_fun_evals`; deterministic;
- `steps_mean`, `steps_max`: per-element iterations, and whether each mode agrees with
  plain `vmap` on every element's steps and result (`same_steps`), with the largest
  relative difference of their gradients;
- with `--time`: compile CPU seconds, and median seconds (CPU seconds too) of the
  compiled program over `--rounds` interleaved rounds, on the mixed batch and on `T`
  copies of its slowest element, for every mode; the CPU ratios against plain `vmap`
  (median over rounds of each round's ratio) and mixed / slowest per mode;
- per mode, `copies_lane_evals` and `copies_steps`: the evaluations the batch of copies
  of the slowest element pays, and its step count, in that mode (a long solve's steps
  change with the rounding of the batch it runs in), and `mode_own_evals`.

    python -m benchmarks.batching --problem imaml --tasks 16 64 --dtype float64 --time
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
# name: (`_batching.MODE`, `_batching.LANES` as a divisor of T or None for the policy,
# `_batching.LOAD_WIDTH` or None for its default, `_batching.BACKWARD`)
MODES = {
    "refill": ("refill", None, None, "auto"),
    "refill-vmapcg": ("refill", None, None, "vmap"),
    "turns": ("turns", None, None, "auto"),
    "vmap": ("vmap", None, None, "auto"),
}
_DEFAULT_WIDTH = []


def _set_mode(batching, name, num):
    mode, divisor, width, backward = MODES[name]
    if not _DEFAULT_WIDTH:
        _DEFAULT_WIDTH.append(batching.LOAD_WIDTH)
    batching.MODE, batching.BACKWARD = mode, backward
    batching.LANES = None if divisor is None else max(1, num // divisor)
    batching.LOAD_WIDTH = _DEFAULT_WIDTH[0] if width is None else width


def _reset_mode(batching):
    batching.MODE, batching.LANES, batching.BACKWARD = "auto", None, "auto"
    if _DEFAULT_WIDTH:
        batching.LOAD_WIDTH = _DEFAULT_WIDTH[0]


def _refill_mode(spec):
    """`refill/D@W` for `--lanes D@W`: T/D lanes (the policy's without `D`), loaded
    W at a time (`LOAD_WIDTH`'s default without `@W`)."""
    divisor, _, width = spec.partition("@")
    name = "refill" + (f"/{divisor}" if divisor else "") + (f"@{width}" if width else "")
    MODES[name] = (
        "refill",
        int(divisor) if divisor else None,
        int(width) if width else None,
        "auto",
    )
    return name


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


def _counter(leaf):
    # One host call per element and evaluation: a batched call reaches the host once per
    # element, so the count is the work the batch pays, independent of the machine.
    jax.debug.callback(lambda *_: _CALLS.__setitem__(0, _CALLS[0] + 1), leaf)


class IMAML:
    """iMAML tasks; the batched data are `(xs, ys, xq, yq)`, `w_meta` is shared."""

    def __init__(self, num, dtype, width):
        self.lam = jnp.asarray(1.0, dtype)
        self.w_meta = _mlp_init(jr.PRNGKey(0), (1, width, width, 1), dtype)
        self.data = _tasks(jr.PRNGKey(num), num, dtype)

    def objective(self, counted):
        # A fresh function object on every call: a new trace of `optimize`.
        def inner(phi, args):
            if counted:
                _counter(phi[0]["b"])
            return _inner(phi, args)

        return inner

    def solve_fn(self, li, inner):
        lam = self.lam

        def solve(w_meta, xs, ys):
            return li.optimize(inner, w_meta, (w_meta, xs, ys, lam), throw=False)

        return solve

    def batch_solve(self, li, inner):
        solve = self.solve_fn(li, inner)
        return lambda w_meta, xs, ys, xq, yq: jax.vmap(solve, in_axes=(None, 0, 0))(w_meta, xs, ys)

    def program(self, li, inner):
        solve = self.solve_fn(li, inner)

        def outer(w_meta, xs, ys, xq, yq):
            sols = jax.vmap(solve, in_axes=(None, 0, 0))(w_meta, xs, ys)
            return jnp.mean((jax.vmap(_mlp)(sols.params, xq) - yq) ** 2)

        return jax.value_and_grad(outer)

    def inputs(self, data=None):
        return (self.w_meta, *(self.data if data is None else data))

    def single_loop(self, li, inner):
        """A loop of `T` compiled single solves and their gradients (the same program)."""
        solve = self.solve_fn(li, inner)

        def one(w_meta, xs, ys, xq, yq):
            sol = solve(w_meta, xs, ys)
            return jnp.mean((_mlp(sol.params, xq) - yq) ** 2)

        return jax.value_and_grad(one)


class MultiStart:
    """`T` starts of one non-convex objective; the batched data are the starts."""

    N = 20

    def __init__(self, num, dtype, width):
        del width
        key = jr.PRNGKey(num)
        self.coef = jnp.linspace(0.5, 1.5, self.N, dtype=dtype)
        self.data = (jr.uniform(key, (num, self.N), dtype, -4.0, 4.0),)

    def objective(self, counted):
        def fn(x, coef):
            if counted:
                _counter(x)
            quartic = 0.5 * jnp.sum(coef * (x**4 - 16 * x**2 + 5 * x))
            return quartic + 2.0 * jnp.sum((x[1:] - 0.3 * x[:-1] ** 2) ** 2)

        return fn

    def batch_solve(self, li, fn):
        def solve(coef, x0):
            return li.optimize(fn, x0, coef, throw=False)

        return jax.vmap(solve, in_axes=(None, 0))

    def program(self, li, fn):
        def outer(coef, x0s):
            sols = self.batch_solve(li, fn)(coef, x0s)
            return jnp.sum(sols.value)

        return jax.value_and_grad(outer)

    def inputs(self, data=None):
        return (self.coef, *(self.data if data is None else data))

    def single_loop(self, li, fn):
        def one(coef, x0):
            return li.optimize(fn, x0, coef, throw=False).value

        return jax.value_and_grad(one)


PROBLEMS = {"imaml": IMAML, "multistart": MultiStart}


def _copies(problem, index):
    """The batch of copies of element `index`."""
    return problem.inputs(tuple(jnp.broadcast_to(a[index], a.shape) for a in problem.data))


def count(li, batching, problem, mode, num, slowest=None):
    """Evaluations and per-element outcomes of the mixed batch in `mode`, and with
    `slowest` (an element), the evaluations of the batch of its copies."""
    _set_mode(batching, mode, num)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(problem.inputs()[0]))
    lanes = batching.num_lanes(num, size) if batching.MODE == "refill" else num
    run = jax.jit(problem.batch_solve(li, problem.objective(counted=True)))
    run = run.lower(*problem.inputs()).compile()
    _reset_mode(batching)

    def counted(inputs):
        _CALLS[0] = 0
        sols = block(run(*inputs))
        jax.effects_barrier()
        return sols, _CALLS[0]

    sols, lane_evals = counted(problem.inputs())
    out = {
        "lanes": lanes,
        "lane_evals": lane_evals,
        "own_evals": int(jnp.sum(sols.stats["num_fun_evals"])),
        "steps": np.asarray(sols.stats["num_steps"]),
        "evals": np.asarray(sols.stats["num_fun_evals"]),
        "result": np.asarray(sols.result._value),
    }
    if slowest is not None:
        sols, out["copies_lane_evals"] = counted(_copies(problem, slowest))
        out["copies_steps"] = int(jnp.max(sols.stats["num_steps"]))
    return out


def _timed(fn, *args):
    block(fn(*args))
    t0, c0 = time.perf_counter(), time.process_time()
    out = block(fn(*args))
    return out, time.perf_counter() - t0, time.process_time() - c0


def timing(li, batching, problem, slowest, rounds, loop, modes, num, forward):
    compiled, compile_s = {}, {}
    inputs = problem.inputs()
    for mode in modes:
        _set_mode(batching, mode, num)
        t0 = time.process_time()
        make = problem.batch_solve if forward else problem.program
        program = make(li, problem.objective(counted=False))
        compiled[mode] = jax.jit(program).lower(*inputs).compile()
        compile_s[mode] = time.process_time() - t0
        _reset_mode(batching)
    batches = {"mixed": inputs, "slowest": _copies(problem, slowest)}
    runs = {(m, b): compiled[m] for m in modes for b in batches}
    if loop:
        one = jax.jit(problem.single_loop(li, problem.objective(counted=False)))
        shared = inputs[: len(inputs) - len(problem.data)]

        def looped(*args):
            data = args[len(shared) :]
            return [one(*shared, *(a[i] for a in data)) for i in range(data[0].shape[0])]

        runs[("loop", "mixed")] = looped
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    outs = {}
    for _ in range(rounds):
        for (mode, batch), fn in runs.items():
            out, w, c = _timed(fn, *batches[batch])
            wall[(mode, batch)].append(w)
            cpu[(mode, batch)].append(c)
            outs[(mode, batch)] = out
    med = {f"{m}-{b}": statistics.median(v) for (m, b), v in wall.items()}
    cpu_med = {f"{m}-{b}": statistics.median(v) for (m, b), v in cpu.items()}

    def paired(a, b):  # median over rounds of the ratio of CPU seconds in one round
        return statistics.median(x / y for x, y in zip(cpu[a], cpu[b]))

    ratios = {f"{m}/vmap-{b}": paired((m, b), ("vmap", b)) for m in modes for b in batches}
    ratios.update({f"{m}-mixed/slowest": paired((m, "mixed"), (m, "slowest")) for m in modes})
    grads = {m: outs[(m, "mixed")] for m in modes}
    if not forward:
        grads = {m: g for m, (_, g) in grads.items()}
    else:
        grads = {m: out.params for m, out in grads.items()}
    gdiff = {
        m: max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["vmap"]))
        )
        for m, g in grads.items()
    }
    return {
        "compile_cpu_s": compile_s,
        "run_s": med,
        "cpu_s": cpu_med,
        "cpu_ratios": ratios,
        "rel_diff_to_vmap": gdiff,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problem", default="imaml", choices=sorted(PROBLEMS))
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--time", action="store_true", help="also time value_and_grad")
    parser.add_argument("--forward", action="store_true", help="time the forward solves only")
    parser.add_argument("--loop", action="store_true", help="also time a loop of T solves")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--lanes",
        nargs="*",
        default=[],
        help="also refill with T/D lanes for each divisor D (mode `refill/D`); `D@W` "
        "with a load width W (`refill/D@W`), `@W` with the policy's lanes",
    )
    parser.add_argument("--modes", nargs="+", default=["refill", "turns", "vmap"])
    parser.add_argument("--out", default=None, help="write the rows as JSON to results/OUT")
    opts = parser.parse_args(argv)
    if opts.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import lbfgs_implicit as li
    import lbfgs_implicit._batching as batching

    modes = list(dict.fromkeys([*opts.modes, *map(_refill_mode, opts.lanes), "vmap"]))
    dtype = jnp.dtype(opts.dtype)
    rows = []
    for num in opts.tasks:
        problem = PROBLEMS[opts.problem](num, dtype, opts.width)
        row = {"problem": opts.problem, "tasks": num, "dtype": opts.dtype}
        size = sum(leaf.nbytes for leaf in jax.tree.leaves(problem.inputs()[0]))
        if batching.uses_turns(li.LBFGS(), num, size):
            lanes = batching.num_lanes(num, size)
            row["auto"] = "turns" if lanes >= num else f"refill, {lanes} lanes"
        else:
            row["auto"] = "vmap"
        counts = {"vmap": count(li, batching, problem, "vmap", num)}
        slowest = int(np.argmax(counts["vmap"]["steps"]))
        counts = {mode: count(li, batching, problem, mode, num, slowest) for mode in modes}
        steps = counts["vmap"]["steps"]
        row.update(
            steps_mean=float(steps.mean()),
            steps_max=int(steps.max()),
            own_evals=counts["vmap"]["own_evals"],
            lanes={m: c["lanes"] for m, c in counts.items()},
            lane_evals={m: c["lane_evals"] for m, c in counts.items()},
            # The elements' own evaluations and the copies' steps per mode: a long solve's
            # step count changes with the rounding of its batch (`same_steps`), here by up
            # to a fifth, so each mode's copies are counted in that mode.
            mode_own_evals={m: c["own_evals"] for m, c in counts.items()},
            copies_lane_evals={m: c["copies_lane_evals"] for m, c in counts.items()},
            copies_steps={m: c["copies_steps"] for m, c in counts.items()},
            # per element against plain `vmap`: steps and result exactly; evaluations
            # can differ by rounding (see tests/test_batching.py)
            same_steps={
                m: bool(
                    np.array_equal(c["steps"], steps)
                    and np.array_equal(c["result"], counts["vmap"]["result"])
                )
                for m, c in counts.items()
            },
        )
        if opts.time:
            row.update(
                timing(
                    li, batching, problem, slowest, opts.rounds, opts.loop, modes, num, opts.forward
                )
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if opts.out:
        command = " ".join(["python -m benchmarks.batching", *sys.argv[1:]])
        write_json(RESULTS_DIR / opts.out, {"command": command, "rows": rows})


if __name__ == "__main__":
    main()
