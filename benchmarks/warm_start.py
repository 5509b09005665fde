"""Warm starts in an outer loop: what `optimize(..., warm_start=prev)` saves.

    python -m benchmarks.warm_start [--quick] [--only NAME] [--out PATH]

Two hyperparameter searches with Adam on hypergradients, one L2 weight per feature:

- `quickstart`: logistic regression on scikit-learn's breast-cancer data, the loop of
  `examples/quickstart.py` (30 log-weights, Adam 0.1, 60 outer steps, float64, gtol and
  gtol_l2 1e-10).
- `digits`: multinomial logistic regression on scikit-learn's bundled digits (8x8
  images, 10 classes, 650 parameters, 64 log-weights, Adam 0.05, 120 outer steps), in
  float64 at gtol 1e-10 and in float32 at its default gtol (2.4e-5).

The outer trajectory is driven by the cold hypergradients; at every outer step each
start is solved at the same hyperparameters, from its own previous solution:

- `cold`: `x0` = zeros, empty memory (every solve from scratch);
- `x0`: `x0` = the previous solution, empty memory;
- `warm`: `x0` = the previous solution, `warm_start` = the previous Solution;
- `newton`: `warm` from `li.newton_start(inner, prev, args)`, $x_{prev} + u$, one
  Newton step on the new problem at the previous solution,
  $H u = -\\nabla_x f(x_{prev}, \\theta)$ solved by CG with exact Hessian-vector
  products to a relative residual of `NEWTON_RTOL`. To first order in $\\Delta\\theta$
  this is the tangent predictor $x_{prev} + (dx^*/d\\theta)\\,\\Delta\\theta$. Its
  value-and-gradient evaluation and its value at the new start are counted with the
  evaluations and its Hessian-vector products are reported apart (`predictor_hvps`);
  its time is in the wall time.
- `extrapolated`: `warm` from `li.newton_start(inner, prev, args, earlier=before)`:
  the same Newton step taken from $2 x_{prev} - x_{before}$, the outer path
  extrapolated linearly, and kept only if its value is at most that of $x_{prev}$ (one
  more value of `inner`, counted with the evaluations).

The first outer step's hyperparameters are solved once, cold, for all starts; then every
start solves at each of the `outer_steps` new hyperparameters. Reported per start: inner
value-and-gradient evaluations summed over those solves, backward CG steps, CPU time
(`time.process_time`) of the jitted value-and-hypergradient (compiled beforehand,
interleaved with the other starts; median per-step ratio to cold), the largest
relative difference of the hypergradient from the cold one, the fewest and most L-BFGS
steps of one solve (`inner_steps_range`), and the median over the first
`START_GRAD_STEPS` outer steps of the inner gradient's infinity norm at the start
(`start_grad_inf_median`, computed apart from the timed calls).
"""

import argparse
import json
import statistics
import time
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

import lbfgs_implicit as li
from lbfgs_implicit._predict import _newton_start
from lbfgs_implicit._solver import default_gtol

from ._common import machine, RESULTS_DIR, setup, write_json


START_KINDS = ("cold", "x0", "warm", "newton", "extrapolated")
NEWTON_RTOL = 1e-2
# The gradient's infinity norm at each start is taken, untimed, over this many first
# outer steps.
START_GRAD_STEPS = 30


class _Counting(li.AbstractAdjoint):
    """`ImplicitAdjoint()` that reports its CG steps to the host (benchmark only)."""

    inner: li.ImplicitAdjoint
    sink: list = eqx.field(static=True)

    exact: ClassVar[bool] = True

    def solve(self, hessian, inverse_approx, v):
        w, result, stats = self.inner.solve(hessian, inverse_approx, v)
        jax.debug.callback(lambda k: self.sink.append(int(k)), stats["num_steps"])
        return w, result, stats

    def __hash__(self):
        return id(self.sink)

    def __eq__(self, other):
        return self is other


def quickstart_problem():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, va = perm[: len(y) // 2], perm[len(y) // 2 :]
    mean, std = X[tr].mean(0), X[tr].std(0)
    X = (X - mean) / std
    data = tuple(jnp.asarray(a, float) for a in (X[tr], y[tr], X[va], y[va]))

    def loss(params, X, y):
        z = X @ params["w"] + params["b"]
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def inner(params, args):
        rho, (Xt, yt, _, _) = args
        return loss(params, Xt, yt) + 0.5 * jnp.sum(jnp.exp(rho) * params["w"] ** 2)

    def outer(params, data):
        return loss(params, data[2], data[3])

    x0 = {"w": jnp.zeros(X.shape[1]), "b": jnp.zeros(())}
    return inner, outer, x0, data, jnp.zeros(X.shape[1]), 0.1


def digits_problem(dtype):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, va = perm[: len(y) // 2], perm[len(y) // 2 :]
    X = X / 16.0
    mean, std = X[tr].mean(0), X[tr].std(0) + 0.1
    X = (X - mean) / std
    Y = np.eye(10)[y]
    data = tuple(jnp.asarray(a, dtype) for a in (X[tr], Y[tr], X[va], Y[va]))

    def loss(params, X, Y):
        z = X @ params["W"] + params["b"]
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.sum(Y * z, axis=1))

    def inner(params, args):
        rho, (Xt, Yt, _, _) = args
        penalty = jnp.sum(jnp.exp(rho)[:, None] * params["W"] ** 2)
        return loss(params, Xt, Yt) + 0.5 * penalty

    def outer(params, data):
        return loss(params, data[2], data[3])

    x0 = {"W": jnp.zeros((64, 10), dtype), "b": jnp.zeros(10, dtype)}
    return inner, outer, x0, data, jnp.full(64, np.log(1e-2), dtype), 0.05


def _start(kind, inner, x0, data, rho, prev, before):
    """The start of `kind`'s solve and the Hessian-vector products it took."""
    hvps = jnp.zeros((), jnp.int32)
    if kind == "cold":
        return x0, hvps
    if kind == "newton":
        # `li.newton_start`, through its private form, which also returns the
        # Hessian-vector products it used.
        start, hvps, _ = _newton_start(inner, prev.params, (rho, data), False, NEWTON_RTOL, 50)
        return start, hvps
    if kind == "extrapolated":
        start, hvps, _ = _newton_start(
            inner, prev.params, (rho, data), False, NEWTON_RTOL, 50, earlier=before.params
        )
        return start, hvps
    return prev.params, hvps


def _start_grad_fns(inner, x0, data):
    """Per start kind: the infinity norm of the inner gradient at that start (untimed)."""

    def norm(kind, rho, prev, before):
        start, _ = _start(kind, inner, x0, data, rho, prev, before)
        grad = jax.grad(inner)(start, (rho, data))
        return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jtu.tree_leaves(grad)]))

    return {kind: jax.jit(lambda r, p, b, kind=kind: norm(kind, r, p, b)) for kind in START_KINDS}


def _step_fns(inner, outer, x0, data, solver, sink):
    adjoint = _Counting(li.ImplicitAdjoint(), sink)

    def run(kind, rho, prev, before):
        warm = prev if kind in ("warm", "newton", "extrapolated") else None
        start, hvps = _start(kind, inner, x0, data, rho, prev, before)

        def loss(rho):
            sol = li.optimize(
                inner,
                start,
                (rho, data),
                solver=solver,
                adjoint=adjoint,
                warm_start=warm,
                throw=False,
            )
            return outer(sol.params, data), sol

        (value, sol), grad = jax.value_and_grad(loss, has_aux=True)(rho)
        return value, grad, sol, hvps

    return {kind: jax.jit(lambda r, p, b, kind=kind: run(kind, r, p, b)) for kind in START_KINDS}


def loop(name, problem, solver, outer_steps):
    inner, outer, x0, data, rho, lr = problem
    sink: list = []
    fns = _step_fns(inner, outer, x0, data, solver, sink)
    start_grad_fns = _start_grad_fns(inner, x0, data)
    # The first hyperparameters, solved cold once for every start: their hypergradient
    # makes the first Adam step, and the starts compete from the next one on.
    _, first_grad, first, _ = jax.block_until_ready(fns["cold"](rho, None, None))
    sink.clear()
    prev = {kind: first for kind in START_KINDS}
    before = {kind: first for kind in START_KINDS}
    evals = {kind: 0 for kind in START_KINDS}
    cg = {kind: 0 for kind in START_KINDS}
    times = {kind: [] for kind in START_KINDS}
    max_diff = {kind: 0.0 for kind in START_KINDS}
    resets = {kind: 0 for kind in START_KINDS}
    predictor_hvps = {kind: 0 for kind in START_KINDS}
    failures = {kind: [] for kind in START_KINDS}
    steps = {kind: [] for kind in START_KINDS}
    start_grads = {kind: [] for kind in START_KINDS}
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(rho)
    updates, opt_state = optimiser.update(first_grad, opt_state)
    rho = optax.apply_updates(rho, updates)
    for kind, fn in fns.items():  # compile outside the timings
        jax.block_until_ready(fn(rho, prev[kind], before[kind]))
    sink.clear()
    losses = []
    for step in range(outer_steps):
        grads = {}
        for kind, fn in fns.items():
            if step < START_GRAD_STEPS:
                norm = start_grad_fns[kind](rho, prev[kind], before[kind])
                start_grads[kind].append(float(norm))
            t0 = time.process_time()
            value, grad, sol, hvps = jax.block_until_ready(fn(rho, prev[kind], before[kind]))
            times[kind].append(time.process_time() - t0)
            jax.effects_barrier()
            cg[kind] += sink.pop()
            assert not sink
            if sol.result != li.RESULTS.successful:
                failures[kind].append((step, li.RESULTS[sol.result], float(sol.stats["grad_norm"])))
            # The predictors' evaluations: value and gradient at their base point and the
            # value at the candidate, and the extrapolated one's value at x_prev.
            extra = {"newton": 2, "extrapolated": 3}.get(kind, 0)
            evals[kind] += int(sol.stats["num_fun_evals"]) + extra
            predictor_hvps[kind] += int(hvps)
            resets[kind] += int(sol.stats["num_resets"])
            steps[kind].append(int(sol.stats["num_steps"]))
            grads[kind] = grad
            before[kind], prev[kind] = prev[kind], sol
            if kind == "cold":
                losses.append(float(value))
        ref = grads["cold"]
        for kind, g in grads.items():
            diff = float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))
            max_diff[kind] = max(max_diff[kind], diff)
        updates, opt_state = optimiser.update(ref, opt_state)
        rho = optax.apply_updates(rho, updates)
    ratio_t = {
        kind: statistics.median(t / c for t, c in zip(times[kind], times["cold"]))
        for kind in START_KINDS
    }
    return {
        "problem": name,
        "dtype": str(jtu.tree_leaves(x0)[0].dtype),
        "gtol": solver.gtol or default_gtol(jtu.tree_leaves(x0)[0].dtype),
        "outer_steps": outer_steps,
        "validation_loss": [losses[0], losses[-1]],
        "evals": evals,
        "evals_ratio": {k: evals[k] / evals["cold"] for k in START_KINDS},
        "cg_steps": cg,
        "predictor_hvps": predictor_hvps,
        "cpu_s": {k: sum(times[k]) for k in START_KINDS},
        "time_ratio_median": ratio_t,
        "max_hypergrad_rel_diff": max_diff,
        "num_resets": resets,
        "inner_steps_range": {k: [min(steps[k]), max(steps[k])] for k in START_KINDS},
        "start_grad_inf_median": {k: statistics.median(start_grads[k]) for k in START_KINDS},
        "failures": failures,
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=None, help="outer steps of every case")
    opts = parser.parse_args(argv)
    setup()
    f64 = li.LBFGS(gtol=1e-10, max_steps=5000)
    cases = [
        ("quickstart", quickstart_problem, li.LBFGS(gtol=1e-10, gtol_l2=1e-10), 60),
        ("digits float64", lambda: digits_problem(jnp.float64), f64, 120),
        ("digits float32", lambda: digits_problem(jnp.float32), li.LBFGS(max_steps=5000), 120),
    ]
    rows = []
    for name, make, solver, steps in cases:
        if opts.only and opts.only not in name:
            continue
        steps = opts.steps or (6 if opts.quick else steps)
        row = loop(name, make(), solver, steps)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    payload = {
        "command": "python -m benchmarks.warm_start"
        + (" --quick" if opts.quick else "")
        + (f" --only {opts.only!r}" if opts.only else "")
        + (f" --steps {opts.steps}" if opts.steps else "")
        + (f" --out {opts.out}" if opts.out else ""),
        "machine": machine(),
        "rows": rows,
    }
    if not opts.quick or opts.out:
        write_json(opts.out or RESULTS_DIR / "warm_start.json", payload)


if __name__ == "__main__":
    main()
