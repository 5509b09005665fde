"""Compile time of the forward solve, repeated and interleaved across solvers.

The forward benchmark compiles each solver once per problem, so its compile column is a
single sample, and single compiles on a shared 2-core machine move by 10-20%. Here every
solver compiles extended Rosenbrock `rounds` times, the solvers taking turns within each
round, and the median and minimum are reported. Each compile wraps the objective in a
new function, so nothing is served from JAX's caches; one untimed compile per solver
first takes JAX's and the solver's one-off start-up out of the numbers. Seconds are
trace + lower + compile, as in `benchmarks.forward`.

    python -m benchmarks.compile_time [--n 1000] [--rounds 7] [--out FILE]
"""

import argparse
import json
import statistics
from pathlib import Path

from . import problems, solvers
from ._common import machine, RESULTS_DIR, setup


ADAPTERS = {
    "lbfgs_implicit": solvers.ours,
    "optax": solvers.optax_lbfgs,
    "jaxopt": solvers.jaxopt_lbfgs,
    "optimistix": solvers.optimistix_lbfgs,
}


def _compile_once(adapter, problem, max_steps):
    def fn(x, args):  # a new function object: JAX traces and compiles afresh
        return problem.fn(x, args)

    _, seconds, _ = adapter(fn, problem.x0, problem.args, max_steps)
    return seconds


def run(n: int, rounds: int, names=tuple(ADAPTERS)) -> dict:
    setup()
    problem = problems.rosenbrock(n)
    warm = problems.rosenbrock(2)
    for name in names:
        _compile_once(ADAPTERS[name], warm, 1000)
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            samples[name].append(_compile_once(ADAPTERS[name], problem, 1000))
    rows = [
        {
            "solver": name,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "samples_s": seconds,
        }
        for name, seconds in samples.items()
    ]
    return {"problem": problem.name, "rounds": rounds, "rows": rows, "machine": machine()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--solvers", default=",".join(ADAPTERS))
    parser.add_argument("--out", default=str(RESULTS_DIR / "compile_time.json"))
    opts = parser.parse_args(argv)
    out = run(opts.n, opts.rounds, tuple(opts.solvers.split(",")))
    for row in out["rows"]:
        print(
            f"{out['problem']}: {row['solver']:15s} compile median {row['median_s']:.3f} s, "
            f"min {row['min_s']:.3f} s over {out['rounds']} rounds",
            flush=True,
        )
    path = Path(opts.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
