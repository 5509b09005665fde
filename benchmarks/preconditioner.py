"""What the L-BFGS memory buys in the backward pass, in time: the jitted pullback.

    python -m benchmarks.preconditioner [--quick] [--out PATH]
    python -m benchmarks.preconditioner --estimates [--out PATH]

For each problem the inner solve runs once (float64, gtol 1e-10); then the pullback of
`jax.vjp` through `li.optimize` (the backward pass alone: Hessian linearisation, the
linear solve, one VJP in theta) is compiled for every way of using the memory and timed
in interleaved rounds, so load on the machine hits all variants alike. Reported: the
median and the minimum over rounds of each variant's time divided by
`precondition=False` (plain CG from zero) in the same round, and the CG steps.

The pullbacks run with `throw=False`: a program that may raise (`throw=True`) is
dispatched through JAX's Python path, which on this machine adds about 0.3-0.8 ms per
call whatever the adjoint, more than the whole backward of the small problems.
Times are CPU seconds (`time.process_time`) of the whole process.

Variants:

- `default`: `li.ImplicitAdjoint()`: the all-pairs policy below where a product with
  the memory is estimated (from the jaxprs) to cost at most a tenth of a
  Hessian-vector product, else plain CG from zero.
- `all_pairs`: `li.ImplicitAdjoint(all_pairs=True)`, CG started from the memory's
  all-pairs inverse $P_\\sigma v$ and preconditioned by it where that start removes half
  of the residual, whatever the costs.
- `hk_start`: `li.ImplicitAdjoint(all_pairs=False)`, plain CG started from $H_k v$.
- `plain`: `li.ImplicitAdjoint(precondition=False)`, CG from zero.
- `pcg_from_Hv`: `li.ImplicitAdjoint(memory_preconditioner=True)`, CG preconditioned
  by $H_k$ and started from $H_k v$ (the library's default before issue 15).
- `default_unchecked`, `plain_unchecked` (only when named in `--variants`): `default`
  and `plain` with `check_degenerate=False`, one Hessian-vector product fewer each.

With `--estimates` nothing is timed: for each problem (cold start) it records the
default's estimate, read while tracing, of a product with the memory and of a
Hessian-vector product, their ratio and so whether the default uses the memory
(`benchmarks/results/preconditioner-estimates.json` unless `--out` says otherwise).

Problems: the four of the hypergradient benchmark's preconditioner table, ridge with
`lam I` + rank 8 (8 rows, n = 2000: ten pairs span the Hessian's low-rank part), the
same spectrum from 4000 dense rows of rank 8 (where a Hessian-vector product costs two
passes over a 4000 x 2000 matrix, so the memory's products are cheap next to it), and
the iMAML inner problem of `examples/meta_learning.py` (an MLP with 1153 parameters,
10 support points, proximal weight 1), cold and warm-started (the memory of a solve at
nearby hyperparameters, then the solve at the new ones from the old solution).
"""

import argparse
import json
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import lbfgs_implicit as li

from ._common import machine, RESULTS_DIR, setup, write_json
from .hypergrad import (
    factor_ridge_problem,
    logistic_problem,
    ridge_inner,
    ridge_outer,
    ridge_problem,
    smoothing_problem,
)


VARIANTS = {
    "default": li.ImplicitAdjoint(),
    "all_pairs": li.ImplicitAdjoint(all_pairs=True),
    "hk_start": li.ImplicitAdjoint(all_pairs=False),
    "plain": li.ImplicitAdjoint(precondition=False),
    "pcg_from_Hv": li.ImplicitAdjoint(memory_preconditioner=True),
    # Not run by default: the same without the degenerate-minimiser test's product.
    "default_unchecked": li.ImplicitAdjoint(check_degenerate=False),
    "plain_unchecked": li.ImplicitAdjoint(precondition=False, check_degenerate=False),
}
DEFAULT_VARIANTS = ("default", "all_pairs", "hk_start", "plain", "pcg_from_Hv")


def lowrank_ridge_problem(n=2000, rows=8, seed=0):
    """Ridge with `rows` training rows: the Hessian is lam I plus a rank-`rows` term."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, n))
    w_true = rng.normal(size=n) / np.sqrt(n)
    y = X @ w_true + 0.1 * rng.normal(size=rows)
    Xv = rng.normal(size=(50, n))
    yv = Xv @ w_true
    data = tuple(jnp.asarray(a) for a in (X, y, Xv, yv))
    return ridge_inner, ridge_outer, jnp.zeros(n), data


def lowrank_dense_ridge_problem(n=2000, rows=4000, rank=8, seed=0):
    """Ridge on `rows` dense rows of rank `rank`: the Hessian is again lam I plus a
    rank-`rank` term, but a Hessian-vector product costs two passes over a dense
    `rows` x `n` matrix (32 Mflop), the memory's product about 4 m n (80 kflop)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, n))
    X = rng.normal(size=(rows, rank)) @ basis
    w_true = rng.normal(size=n) / np.sqrt(n)
    y = X @ w_true + 0.1 * rng.normal(size=rows)
    Xv = rng.normal(size=(50, rank)) @ basis
    yv = Xv @ w_true
    data = tuple(jnp.asarray(a) for a in (X, y, Xv, yv))
    return ridge_inner, ridge_outer, jnp.zeros(n), data


def imaml_problem(seed=0, lam=1.0, shots=10):
    """The iMAML inner problem: support MSE of a 1-32-32-1 tanh MLP + lam/2 ||phi - theta||^2."""
    k_init, k_task = jr.split(jr.PRNGKey(seed))
    sizes = (1, 32, 32, 1)
    theta = []
    for k, (m, n) in zip(jr.split(k_init, 3), zip(sizes[:-1], sizes[1:])):
        theta.append({"w": jr.normal(k, (m, n)) * np.sqrt(1.0 / m), "b": jnp.zeros(n)})
    ka, kp, kx = jr.split(k_task, 3)
    amp = jr.uniform(ka, (), minval=0.1, maxval=5.0)
    phase = jr.uniform(kp, (), minval=0.0, maxval=jnp.pi)
    x = jr.uniform(kx, (2 * shots,), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x + phase)
    data = (x[:shots], y[:shots], x[shots:], y[shots:])

    def mlp(params, x):
        h = x[:, None]
        for layer in params[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return (h @ params[-1]["w"] + params[-1]["b"])[:, 0]

    def inner(phi, args):
        theta, (xs, ys, _, _) = args
        sq = sum(
            jnp.sum((a - b) ** 2) for a, b in zip(jtu.tree_leaves(phi), jtu.tree_leaves(theta))
        )
        return jnp.mean((mlp(phi, xs) - ys) ** 2) + 0.5 * lam * sq

    def outer(phi, data):
        _, _, xq, yq = data
        return jnp.mean((mlp(phi, xq) - yq) ** 2)

    return inner, outer, theta, data


def _problems(quick):
    n_r, n_s = (200, 1000) if quick else (2000, 10_000)
    log = jnp.asarray
    rows = [
        ("ridge, isotropic features", *ridge_problem(n_r, 2 * n_r, 2 * n_r)[:4], log(np.log(0.1))),
        ("ridge, 5 common factors", *factor_ridge_problem(n_r, 2 * n_r, 5), log(np.log(0.1))),
        ("smoothing", *smoothing_problem(n_s)[:4], log(np.log(10.0))),
    ]
    inner, outer, x0, data = logistic_problem()
    rows.append(("per-feature L2 logistic", inner, outer, x0, data, jnp.full(30, np.log(1e-2))))
    rows.append(("ridge, lam I + rank 8", *lowrank_ridge_problem(n_r), log(np.log(0.1))))
    rows.append(
        (
            f"ridge, {2 * n_r} dense rows of rank 8",
            *lowrank_dense_ridge_problem(n_r, 2 * n_r),
            log(np.log(0.1)),
        )
    )
    inner, outer, theta, data = imaml_problem()
    rows.append(("iMAML inner problem", inner, outer, theta, data, theta))
    return rows


def _case(name, inner, outer, x0, data, theta, warm, rounds, variants):
    solver = li.LBFGS(max_steps=5000, gtol=1e-10)
    prev = None
    if warm:
        # The memory of a solve at hyperparameters 5% away (relative), the new solve
        # started from its solution: an outer step of a hyperparameter search.
        theta_prev = jtu.tree_map(lambda t: t * 1.05 + 0.01, theta)
        prev = li.optimize(inner, x0, (theta_prev, data), solver=solver)
        x0 = prev.params

    pulls, steps, grads = {}, {}, {}
    for key in variants:
        adjoint = VARIANTS[key]

        def loss(theta, data, x0, prev, adjoint=adjoint):
            sol = li.optimize(
                inner,
                x0,
                (theta, data),
                solver=solver,
                adjoint=adjoint,
                warm_start=prev,
                throw=False,
            )
            return outer(sol.params, data)

        # Data, start and memory are arguments, not constants: XLA would constant-fold
        # products with closed-over matrices at compile time.
        value, pullback = jax.jit(
            lambda t, d, x, p, loss=loss: jax.vjp(lambda t: loss(t, d, x, p), t)
        )(theta, data, x0, prev)
        pull = jax.jit(lambda p, ct: p(ct)).lower(pullback, jnp.ones_like(value)).compile()
        pulls[key] = (pull, pullback, jnp.ones_like(value))
        (grads[key],) = jax.block_until_ready(pull(pullback, jnp.ones_like(value)))
        steps[key] = _cg_steps(inner, outer, x0, data, theta, solver, adjoint, prev)

    ref = grads["plain"]
    for key, g in grads.items():
        err = _rel(g, ref)
        assert err < 1e-6, (name, key, err)

    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, (pull, pb, ct) in pulls.items():
            reps = 1
            t0 = time.process_time()
            jax.block_until_ready(pull(pb, ct))
            once = time.process_time() - t0
            # Short pullbacks are repeated so one timing covers at least ~20 ms.
            reps = max(1, min(200, int(0.02 / max(once, 1e-6))))
            t0 = time.process_time()
            for _ in range(reps):
                out = pull(pb, ct)
            jax.block_until_ready(out)
            times[key].append((time.process_time() - t0) / reps)
    per_round = {key: [t / p for t, p in zip(times[key], times["plain"])] for key in variants}
    ratios = {key: statistics.median(r) for key, r in per_round.items()}
    ratios_min = {key: min(r) for key, r in per_round.items()}
    return {
        "problem": name + (", warm-started" if warm else ""),
        "n": sum(leaf.size for leaf in jtu.tree_leaves(x0)),
        "plain_s": statistics.median(times["plain"]),
        "ratio_to_plain": ratios,
        "ratio_to_plain_min": ratios_min,
        "cg_steps": steps,
    }


def _estimate(name, inner, outer, x0, data, theta):
    """The default's cost estimates, memory product and Hessian-vector product, as traced."""
    from lbfgs_implicit import _adjoint

    costs = []
    cost = _adjoint._cost

    def recording(fn, *args):
        costs.append(cost(fn, *args))
        return costs[-1]

    solver = li.LBFGS(max_steps=5000, gtol=1e-10)

    def loss(theta, data, x0):
        sol = li.optimize(
            inner, x0, (theta, data), solver=solver, adjoint=VARIANTS["default"], throw=False
        )
        return outer(sol.params, data)

    # Problems that share `ridge_inner` and its shapes would reuse a cached trace.
    jax.clear_caches()
    _adjoint._cost = recording
    try:
        jax.jit(jax.grad(loss)).lower(theta, data, x0)
    finally:
        _adjoint._cost = cost
    # `ImplicitAdjoint` estimates the memory's product first, then the Hessian's.
    memory, hvp = costs[:2]
    return {
        "problem": name,
        "n": sum(leaf.size for leaf in jtu.tree_leaves(x0)),
        "memory_cost": memory,
        "hvp_cost": hvp,
        "memory_over_hvp": memory / hvp,
        "default_uses_memory": memory <= _adjoint.MEMORY_COST * hvp,
    }


def _rel(a, b):
    a, b = jtu.tree_leaves(a), jtu.tree_leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(jnp.sum(y**2)) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def _cg_steps(inner, outer, x0, data, theta, solver, adjoint, prev):
    """The backward CG steps of this variant, read from a verbose run."""
    import contextlib
    import io
    import re

    out = io.StringIO()
    verbose = eqx.tree_at(lambda s: s.verbose, solver, True)
    with contextlib.redirect_stdout(out):
        jax.grad(
            lambda t: outer(
                li.optimize(
                    inner, x0, (t, data), solver=verbose, adjoint=adjoint, warm_start=prev
                ).params,
                data,
            )
        )(theta)
        jax.effects_barrier()
    found = re.findall(r"implicit backward: (\d+) linear-solve steps", out.getvalue())
    return int(found[-1])


def _payload(opts, rows):
    command = "python -m benchmarks.preconditioner" + (" --quick" if opts.quick else "")
    for flag in ("rounds", "only", "starts", "variants", "out"):
        value = getattr(opts, flag)
        if value is not None and value != _DEFAULTS.get(flag):
            command += f" --{flag} {value!r}"
    return {"command": command, "machine": machine(), "rows": rows}


_DEFAULTS = {"rounds": 15, "starts": "cold,warm", "variants": ",".join(DEFAULT_VARIANTS)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--only", default=None, help="comma-separated substrings of the problem names to run"
    )
    parser.add_argument("--starts", default="cold,warm", help="cold, warm or both")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--estimates", action="store_true")
    opts = parser.parse_args(argv)
    setup()
    if opts.estimates:
        rows = []
        for problem in _problems(opts.quick):
            if opts.only and not any(part in problem[0] for part in opts.only.split(",")):
                continue
            rows.append(_estimate(*problem))
            print(rows[-1], flush=True)
        payload = _payload(opts, rows)
        payload["command"] = payload["command"].replace(
            "benchmarks.preconditioner", "benchmarks.preconditioner --estimates", 1
        )
        write_json(opts.out or RESULTS_DIR / "preconditioner-estimates.json", payload)
        return
    rows = []
    for problem in _problems(opts.quick):
        if opts.only and not any(part in problem[0] for part in opts.only.split(",")):
            continue
        for warm in [s == "warm" for s in opts.starts.split(",")]:
            variants = opts.variants.split(",")
            row = _case(
                *problem, warm=warm, rounds=3 if opts.quick else opts.rounds, variants=variants
            )
            rows.append(row)
            ratios = " ".join(
                f"{k}={v:.2f}/{row['ratio_to_plain_min'][k]:.2f}"
                for k, v in row["ratio_to_plain"].items()
            )
            print(
                f"{row['problem']:40s} n={row['n']:6d} plain {1e3 * row['plain_s']:8.3f} ms  "
                f"{ratios}  CG {row['cg_steps']}",
                flush=True,
            )
            if not opts.quick or opts.out:
                # Written after every row, so a run stopped early keeps what it measured.
                write_json(opts.out or RESULTS_DIR / "preconditioner.json", _payload(opts, rows))
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
