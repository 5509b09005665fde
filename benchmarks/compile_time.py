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
import sys
from pathlib import Path

from . import problems, solvers
from ._common import machine, RESULTS_DIR, setup


# The JAX solvers; SciPy's compile is only its jitted value-and-grad.
JAX_SOLVERS = tuple(name for name in solvers.ADAPTERS if name != "scipy")


def _compile_once(adapter, problem, max_steps):
    def fn(x, args):  # a new function object: JAX traces and compiles afresh
        return problem.fn(x, args)

    _, seconds, _ = adapter(fn, problem.x0, problem.args, max_steps)
    return seconds


def run(n: int, rounds: int, names=JAX_SOLVERS) -> dict:
    setup()
    problem = problems.rosenbrock(n)
    warm = problems.rosenbrock(2)
    for name in names:
        _compile_once(solvers.ADAPTERS[name], warm, 1000)
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            samples[name].append(_compile_once(solvers.ADAPTERS[name], problem, 1000))
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
    parser.add_argument("--solvers", default=",".join(JAX_SOLVERS))
    parser.add_argument("--out", default=str(RESULTS_DIR / "compile_time.json"))
    opts = parser.parse_args(argv)
    out = run(opts.n, opts.rounds, tuple(opts.solvers.split(",")))
    out["command"] = "python -m benchmarks.compile_time " + " ".join(argv or sys.argv[1:])
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
