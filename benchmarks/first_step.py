"""The first trial step with an empty memory: unit length in the 2-norm or the max norm.

    python -m benchmarks.first_step [--mode full|quick|smoke] [--problems A,B] [--out PATH]

Our L-BFGS takes $a_0 = 1/\\|\\nabla f(x_0)\\|_2$ on the first iteration (SciPy's choice)
and at most that on a retry with an empty memory. The alternative measured here is a unit
step in the max norm, $1/\\|\\nabla f(x_0)\\|_\\infty$, everything else unchanged. Both
solve the forward benchmark's problems with its settings (`benchmarks.solvers`: history
10, `gtol` 1e-6 on the infinity norm, its `max_steps`), and each row records the
iterations, evaluations and whether the final gradient met `gtol`; `totals` sums each
rule's evaluations and solved problems, `both_converged` the evaluations over the problems
both rules solved. Counts only: no timings, so the load of the machine does not matter.
"""

import argparse
import json

import jax
import jax.numpy as jnp

import lbfgs_implicit as li
from lbfgs_implicit._misc import tree_norm_inf

from ._common import machine, RESULTS_DIR, setup, write_json
from .forward import MAX_STEPS
from .problems import problem_set
from .solvers import GTOL, HISTORY


class _MaxNormFirstStep(li.LBFGS):
    """`li.LBFGS` whose empty-memory trial step has unit max norm (benchmark only)."""

    def setup(self, state):
        out = super().setup(state)
        if state.box is not None:
            return out
        dtype = state.f.dtype
        # With an empty memory p = -g and the parent's first trial is 1/|g|_2 (on a
        # retry at most 1): the same with |g|_inf.
        ginf = tree_norm_inf(state.g).astype(dtype)
        safe = jnp.where(ginf > 0, ginf, 1)
        empty = jnp.where(state.num_steps == 0, 1 / safe, jnp.minimum(1, 1 / safe))
        step0 = jnp.where(out.history.count == 0, empty, out.step0)
        return type(out)(history=out.history, p=out.p, dg=out.dg, step0=step0, cap=out.cap)


RULES = {"l2": li.LBFGS, "max": _MaxNormFirstStep}


def solve(problem, rule, max_steps):
    solver = RULES[rule](history_size=HISTORY, max_steps=max_steps, gtol=GTOL)
    sol = li.optimize(problem.fn, problem.x0, problem.args, solver=solver, throw=False)
    grad = jax.grad(problem.fn)(sol.params, problem.args)
    grad_inf = float(tree_norm_inf(grad))
    return {
        "problem": problem.name,
        "n": problem.n,
        "rule": rule,
        "iters": int(sol.stats["num_steps"]),
        "evals": int(sol.stats["num_fun_evals"]),
        "value": float(sol.value),
        "grad_inf": grad_inf,
        "converged": bool(grad_inf <= GTOL),
        "result": str(sol.result),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="full", choices=("full", "quick", "smoke"))
    parser.add_argument("--problems", default=None, help="comma-separated names")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    setup()
    keep = set(opts.problems.split(",")) if opts.problems else None
    rows = []
    for load in problem_set(opts.mode, keep):
        problem = load()
        if keep is not None and problem.name not in keep:
            continue
        for rule in RULES:
            rows.append(solve(problem, rule, MAX_STEPS[opts.mode]))
            print(json.dumps(rows[-1]), flush=True)
    totals = {
        rule: {
            "evals": sum(r["evals"] for r in rows if r["rule"] == rule),
            "converged": sum(r["converged"] for r in rows if r["rule"] == rule),
            "problems": sum(r["rule"] == rule for r in rows),
        }
        for rule in RULES
    }
    # Evaluations compare only where both rules met `gtol`.
    by = {}
    for r in rows:
        by.setdefault(r["problem"], {})[r["rule"]] = r
    both = [name for name, pair in by.items() if all(r["converged"] for r in pair.values())]
    both_converged = {
        "problems": len(both),
        "evals": {rule: sum(by[name][rule]["evals"] for name in both) for rule in RULES},
    }
    print(json.dumps(totals), json.dumps(both_converged), flush=True)
    payload = {
        "command": "python -m benchmarks.first_step --mode "
        + opts.mode
        + (f" --problems {opts.problems}" if opts.problems else "")
        + (f" --out {opts.out}" if opts.out else ""),
        "machine": machine(),
        "gtol": GTOL,
        "history": HISTORY,
        "max_steps": MAX_STEPS[opts.mode],
        "totals": totals,
        "both_converged": both_converged,
        "rows": rows,
    }
    write_json(opts.out or RESULTS_DIR / f"first_step-{opts.mode}.json", payload)


if __name__ == "__main__":
    main()
