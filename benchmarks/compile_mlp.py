"""Compile time of a hypergradient through an MLP inner problem, against the peers.

The iMAML inner problem of `benchmarks.batching` (a 1-40-40-1 MLP, six leaves: the
support loss plus `lam/2 ||phi - w_meta||^2`), and `jax.value_and_grad` of the mean
query loss with respect to `w_meta`, for one task and for `vmap` over 16 tasks. Solvers:
ours (`ImplicitAdjoint`, the leaves solved as one vector; `lbfgs_implicit_leafwise`, the
per-leaf program that `optimize` builds with `_optimize._FLATTEN` off; and on request
`lbfgs_implicit_flat`, the parameters raveled by the caller),
`jaxopt.LBFGS(implicit_diff=True)`, optimistix's `LBFGS` with
`ImplicitAdjoint(CG)`, and the baseline every user can write: 100 steps of gradient
descent unrolled by `lax.fori_loop` and differentiated through.

Each compile wraps the objective in a new function object, so nothing is served from
JAX's caches; the solvers take turns within each of `--rounds` rounds, and the median
and minimum are reported, as wall seconds (trace + lower + compile) and as the process's
CPU seconds (less sensitive to a shared machine's load, but counting XLA's threads).
With `--calls K`, each compiled program is also called K times after one untimed call,
and the median CPU seconds per call is reported (`run_cpu_median_s`).

With `--split`, every row also has the medians of the three stages' CPU seconds:
`trace_cpu_median_s` (`jax.jit(f).trace`: Python tracing and autodiff),
`lower_cpu_median_s` (`.lower()`: the jaxpr to StableHLO) and `xla_cpu_median_s`
(`.compile()`: XLA's HLO passes, kernel emission and LLVM), and the program's size:
`stablehlo_ops` (operations in the lowered module) and `kernels` (the compiled HLO's
instructions outside fusion bodies, less parameters, tuples and constants: about one
kernel or runtime step each); a second table prints them.

    python -m benchmarks.compile_mlp [--rounds 3] [--tasks 16] [--calls K] [--split] [--out FILE]
"""

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr

from ._common import machine, RESULTS_DIR, setup, write_json
from .batching import _inner, _mlp, _mlp_init, _tasks


SOLVERS = ("lbfgs_implicit", "lbfgs_implicit_leafwise", "jaxopt", "optimistix", "unrolled_gd")
# Also available with `--solvers`: `lbfgs_implicit_flat`, the parameters raveled by the caller,
# and `lbfgs_implicit_unchecked`, ours with `ImplicitAdjoint(check_degenerate=False)`.

GD_STEPS = 100
GD_RATE = 0.05
MAX_STEPS = 1000


def _solve(name, fn):
    """`solve(w_meta, xs, ys, lam) -> phi*`, differentiable by the solver's own method."""
    if name in ("lbfgs_implicit", "lbfgs_implicit_leafwise", "lbfgs_implicit_unchecked"):
        import lbfgs_implicit as li

        solver = li.LBFGS(max_steps=MAX_STEPS)
        adjoint = li.ImplicitAdjoint(check_degenerate=name != "lbfgs_implicit_unchecked")
        return lambda w, xs, ys, lam: (
            li.optimize(fn, w, (w, xs, ys, lam), solver=solver, adjoint=adjoint, throw=False).params
        )
    if name == "lbfgs_implicit_flat":
        # The parameters raveled into one vector by the caller, which `optimize` now
        # does itself: this should compile like `lbfgs_implicit`.
        from jax.flatten_util import ravel_pytree

        import lbfgs_implicit as li

        solver = li.LBFGS(max_steps=MAX_STEPS)

        def solve(w, xs, ys, lam):
            flat, unravel = ravel_pytree(w)
            sol = li.optimize(
                lambda v, args: fn(unravel(v), args),
                flat,
                (w, xs, ys, lam),
                solver=solver,
                throw=False,
            )
            return unravel(sol.params)

        return solve
    if name == "jaxopt":
        import jaxopt

        solver = jaxopt.LBFGS(fun=fn, tol=1e-10, maxiter=MAX_STEPS, implicit_diff=True)
        return lambda w, xs, ys, lam: solver.run(w, (w, xs, ys, lam)).params
    if name == "optimistix":
        import lineax as lx
        import optimistix as optx

        solver = optx.LBFGS(rtol=1e-10, atol=1e-10)
        adjoint = optx.ImplicitAdjoint(lx.CG(rtol=1e-10, atol=1e-10))
        tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})

        def solve(w, xs, ys, lam):
            args = (w, xs, ys, lam)
            return optx.minimise(
                fn, solver, w, args, max_steps=MAX_STEPS, adjoint=adjoint, throw=False, tags=tags
            ).value

        return solve
    if name == "unrolled_gd":

        def solve(w, xs, ys, lam):
            grad = jax.grad(fn)

            def step(_, phi):
                g = grad(phi, (w, xs, ys, lam))
                return jax.tree.map(lambda p, d: p - GD_RATE * d, phi, g)

            return jax.lax.fori_loop(0, GD_STEPS, step, w)

        return solve
    raise ValueError(f"unknown solver {name!r}")


def _loss(name, tasks):
    def fn(phi, args):  # a new function object per compile: no cache hits
        return _inner(phi, args)

    solve = _solve(name, fn)
    if tasks == 1:

        def loss(w, xs, ys, xq, yq, lam):
            phi = solve(w, xs[0], ys[0], lam)
            return jnp.mean((_mlp(phi, xq[0]) - yq[0]) ** 2)

    else:

        def loss(w, xs, ys, xq, yq, lam):
            phis = jax.vmap(solve, in_axes=(None, 0, 0, None))(w, xs, ys, lam)
            return jnp.mean((jax.vmap(_mlp)(phis, xq) - yq) ** 2)

    return jax.value_and_grad(loss)


def compile_seconds(name, tasks, w_meta, data, lam):
    """(wall, CPU) seconds of trace + lower + compile of the loss's value_and_grad, the
    compiled program, and the split (see `--split`)."""
    from lbfgs_implicit import _optimize

    f = _loss(name, tasks)
    # `lbfgs_implicit_leafwise`: the library's per-leaf program, as before it solved
    # multi-leaf parameters over one vector (the switch is read while tracing).
    _optimize._FLATTEN = name != "lbfgs_implicit_leafwise"
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        traced = jax.jit(f).trace(w_meta, *data, lam)
        cpu1 = time.process_time()
        lowered = traced.lower()
        cpu2 = time.process_time()
        compiled = lowered.compile()
        wall, cpu3 = time.perf_counter() - wall0, time.process_time()
    finally:
        _optimize._FLATTEN = True
    split = {"trace": cpu1 - cpu0, "lower": cpu2 - cpu1, "xla": cpu3 - cpu2}
    return wall, cpu3 - cpu0, compiled, split, lowered


def stablehlo_ops(lowered) -> int:
    """Operations in the lowered StableHLO module (lines that assign a result)."""
    return sum(" = " in line for line in lowered.as_text().splitlines())


_BOOKKEEPING = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def kernels(compiled) -> int:
    """Instructions of the compiled HLO outside fusion bodies and reducers, less
    parameters, tuples and constants: fusions, copies, dots, loops, conditionals, custom
    calls. XLA:CPU emits and compiles code for each, so its compile time follows them."""
    text = compiled.as_text()
    # Fusion bodies and reducers (`to_apply` of anything but a `call`, which is how
    # XLA:CPU wraps a small loop) are parts of one kernel.
    bodies = set(re.findall(r"calls=%([\w.\-]+)", text))
    bodies.update(re.findall(r" (?!call\()[a-z\-]+\(.*to_apply=%([\w.\-]+)", text))
    count, inside = 0, False
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            inside = header[1] in bodies
        elif not inside and line.startswith("  ") and " = " in line:
            op = re.search(r"\s([a-z][a-z\-]*)\(", line.split(" = ", 1)[1])
            count += op is not None and op[1] not in _BOOKKEEPING
    return count


def run_seconds(compiled, args, calls):
    """Median CPU seconds of this process per call of `compiled`, after one untimed call."""
    jax.block_until_ready(compiled(*args))
    cpus = []
    for _ in range(calls):
        cpu0 = time.process_time()
        jax.block_until_ready(compiled(*args))
        cpus.append(time.process_time() - cpu0)
    return statistics.median(cpus)


def run(rounds, batch, solvers=SOLVERS, calls=0, split=False):
    setup()
    dtype = jnp.float64
    lam = jnp.asarray(1.0, dtype)
    w_meta = _mlp_init(jr.PRNGKey(0), (1, 40, 40, 1), dtype)
    data = _tasks(jr.PRNGKey(1), batch, dtype)
    cases = [(1, data), (batch, data)]
    for name in solvers:  # one-off start-up (imports, first traces) out of the numbers
        compile_seconds(name, 1, w_meta, data, lam)
    samples = {(name, t): [] for t, _ in cases for name in solvers}
    run_cpus = {key: [] for key in samples}
    splits = {key: [] for key in samples}
    sizes = {}
    errors = {}
    for _ in range(rounds):
        for tasks, d in cases:
            for name in solvers:
                if (name, tasks) in errors:
                    continue
                try:
                    wall, cpu, compiled, parts, lowered = compile_seconds(
                        name, tasks, w_meta, d, lam
                    )
                    if split and (name, tasks) not in sizes:
                        sizes[(name, tasks)] = (stablehlo_ops(lowered), kernels(compiled))
                    splits[(name, tasks)].append(parts)
                    if calls:
                        args = (w_meta, *d, lam)
                        run_cpus[(name, tasks)].append(run_seconds(compiled, args, calls))
                except Exception as e:  # a peer failing is a result
                    errors[(name, tasks)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"tasks={tasks:3d} {name:15s} failed: {errors[(name, tasks)]}")
                    continue
                samples[(name, tasks)].append((wall, cpu))
                line = f"tasks={tasks:3d} {name:15s} wall {wall:6.2f} s cpu {cpu:6.2f} s"
                if calls:
                    line += f" run cpu {run_cpus[(name, tasks)][-1] * 1e3:8.2f} ms/call"
                if split:
                    line += " (trace {trace:.2f}, lower {lower:.2f}, xla {xla:.2f})".format(**parts)
                print(line, flush=True)
    rows = [{"solver": n, "tasks": t, "error": e} for (n, t), e in errors.items()]
    for (name, tasks), s in samples.items():
        if not s:
            continue
        walls, cpus = [w for w, _ in s], [c for _, c in s]
        rows.append(
            {
                "solver": name,
                "tasks": tasks,
                "wall_median_s": statistics.median(walls),
                "wall_min_s": min(walls),
                "cpu_median_s": statistics.median(cpus),
                "cpu_min_s": min(cpus),
            }
        )
        if run_cpus[(name, tasks)]:
            rows[-1]["run_cpu_median_s"] = statistics.median(run_cpus[(name, tasks)])
        if split:
            for stage in ("trace", "lower", "xla"):
                values = [p[stage] for p in splits[(name, tasks)]]
                rows[-1][f"{stage}_cpu_median_s"] = statistics.median(values)
            rows[-1]["stablehlo_ops"], rows[-1]["kernels"] = sizes[(name, tasks)]
    return {"rounds": rounds, "rows": rows, "machine": machine(), "gd_steps": GD_STEPS}


def table_lines(data):
    """The Markdown table (also used by `benchmarks.report`): median CPU seconds (wall
    seconds in brackets), ratios of CPU medians, which a shared machine's load moves less."""
    by = {(r["solver"], r["tasks"]): r for r in data["rows"] if "error" not in r}
    tasks = sorted({r["tasks"] for r in data["rows"]})
    extra = ("lbfgs_implicit_unchecked", "lbfgs_implicit_flat")
    solvers = [s for s in SOLVERS + extra if any(r["solver"] == s for r in data["rows"])]
    lines = [
        "| tasks | " + " | ".join(solvers) + " | ours / best peer | ours / unrolled GD |",
        "| ---: | " + " | ".join("---:" for _ in solvers) + " | ---: | ---: |",
    ]
    for t in tasks:
        cpu = {s: by[(s, t)]["cpu_median_s"] for s in solvers if (s, t) in by}
        peers = [cpu[s] for s in ("jaxopt", "optimistix") if s in cpu]
        ours = cpu.get("lbfgs_implicit")
        best = f"{ours / min(peers):.2f}" if ours and peers else "-"
        gd = f"{ours / cpu['unrolled_gd']:.2f}" if ours and "unrolled_gd" in cpu else "-"
        cells = " | ".join(
            f"{cpu[s]:.1f} ({by[(s, t)]['wall_median_s']:.1f})" if s in cpu else "failed"
            for s in solvers
        )
        lines.append(f"| {t} | {cells} | {best} | {gd} |")
    return lines


def split_lines(data):
    """Per program: median CPU seconds of each stage, and the program's size."""
    lines = [
        "| solver | tasks | trace | lower | XLA compile | StableHLO ops | kernels |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(data["rows"], key=lambda r: (r["tasks"], r["solver"])):
        if "trace_cpu_median_s" in r:
            lines.append(
                f"| {r['solver']} | {r['tasks']} | {r['trace_cpu_median_s']:.2f} | "
                f"{r['lower_cpu_median_s']:.2f} | {r['xla_cpu_median_s']:.2f} | "
                f"{r['stablehlo_ops']} | {r['kernels']} |"
            )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--calls", type=int, default=0, help="also time K calls of each")
    parser.add_argument(
        "--split", action="store_true", help="also CPU s of trace, lower and XLA, and sizes"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "compile_mlp.json"))
    opts = parser.parse_args(argv)
    out = run(opts.rounds, opts.tasks, tuple(opts.solvers.split(",")), opts.calls, opts.split)
    out["command"] = "python -m benchmarks.compile_mlp " + " ".join(argv or sys.argv[1:])
    print("\n".join(table_lines(out)))
    if opts.split:
        print("\n".join(split_lines(out)))
    write_json(opts.out, out)
    return out


if __name__ == "__main__":
    main()
