"""One benchmark command under several process-wide XLA settings, by turns.

XLA reads `XLA_FLAGS` once per process, so each setting runs the command in its own
subprocess; the settings take turns within each of `--rounds` rounds, so that a slow
spell of a shared machine lands on all of them alike. The command is any benchmark
module that takes `--out FILE` (`compile_mlp`, `forward`, `batching`, ...); this driver
appends `--out` and reads the json back. Reported per setting: the median over rounds
of every number in that json (rows labelled by their text fields: solver, problem,
...), of the subprocess's CPU seconds (user + system, all threads) and, for the numbers
named like `--metric`, the median over rounds of each round's ratio to `default`.

    python -m benchmarks.xla_settings --name mlp --rounds 3 \\
        -- benchmarks.compile_mlp --rounds 1 --calls 20

Settings (`--settings`, comma-separated): `default` (`XLA_FLAGS` as inherited), `O0`
and `O1` (`--xla_backend_optimization_level`: no or little LLVM optimisation of the CPU
kernels), `1thread` (XLA:CPU's multi-threaded Eigen kernels off),
`1thread-O0`, `pinned` (`1thread` under `taskset -c 0`), `loops64k` and `loops1M`
(XLA:CPU's threshold for compiling a small `while` loop into one kernel raised from
1 kB to 64 kB or 1 MB), and on a GPU `gpu_loops` (XLA:GPU runs `while` loops and
conditionals inside CUDA graphs, on the device, instead of copying each condition to
the host).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import machine, RESULTS_DIR, write_json


# Not `... intra_op_parallelism_threads=1`, as often quoted: that is no XLA flag, and
# XLA stops reading `XLA_FLAGS` at it, silently dropping every flag after it.
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"
_SMALL_LOOPS = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold={}"
SETTINGS = {
    "default": ("", False),
    "O0": ("--xla_backend_optimization_level=0", False),
    "O1": ("--xla_backend_optimization_level=1", False),
    "1thread": (_ONE_THREAD, False),
    "1thread-O0": (_ONE_THREAD + " --xla_backend_optimization_level=0", False),
    "pinned": (_ONE_THREAD, True),
    # XLA:CPU compiles a `while` loop into one kernel (no per-operation dispatch) when the
    # loop holds no dot, convolution, scatter or custom call and its operations touch
    # fewer bytes than this (1 kB by default): a whole solve of a few parameters fits
    # from about 16 kB.
    "loops64k": (_SMALL_LOOPS.format(65_536), False),
    "loops1M": (_SMALL_LOOPS.format(1_048_576), False),
    # On a GPU each turn of a `while` loop (and each `lax.cond`) otherwise waits for its
    # predicate on the host: on problems of a few parameters, most of an iteration.
    "gpu_loops": (
        "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
        False,
    ),
}
_LABELS = ("solver", "problem", "mode", "dtype", "tasks", "n")


def _run(setting, command, out):
    flags, pinned = SETTINGS[setting]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, (env.get("XLA_FLAGS", ""), flags)))
    argv = [sys.executable, "-m", *command, "--out", str(out)]
    argv = ["taskset", "-c", "0", *argv] if pinned else argv
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{setting}: {' '.join(argv)} failed\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return json.loads(Path(out).read_text()), cpu, wall


def _numbers(tree, prefix=""):
    """{path: number} of a json tree; list items that are dicts are named by `_LABELS`."""
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return {}
    if isinstance(tree, int | float):
        return {prefix: float(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found = {}
    for key, value in items:
        if isinstance(value, dict) and not isinstance(tree, dict):
            key = ",".join(str(value[k]) for k in _LABELS if k in value) or key
        if key == "machine":
            continue
        found.update(_numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    return found


def run(command, settings, rounds, metric):
    samples = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for s in settings:
                data, cpu, wall = _run(s, command, Path(tmp) / f"{s}-{r}.json")
                found = _numbers(data)
                found["process_cpu_s"], found["process_wall_s"] = cpu, wall
                samples[s].append(found)
                print(f"round {r} {s:11s} process cpu {cpu:7.1f} s wall {wall:7.1f} s", flush=True)
    keys = [k for k in samples[settings[0]][0] if all(k in x for v in samples.values() for x in v)]
    medians = {s: {k: statistics.median(x[k] for x in samples[s]) for k in keys} for s in settings}
    pattern = re.compile(metric)
    ratios = {}
    if "default" in settings:
        for s in settings:
            ratios[s] = {
                k: statistics.median(
                    x[k] / d[k] for x, d in zip(samples[s], samples["default"]) if d[k] > 0
                )
                for k in keys
                if pattern.search(k) and all(d[k] > 0 for d in samples["default"])
            }
    return {"rounds": rounds, "medians": medians, "ratios_to_default": ratios}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="writes results/xla_settings-NAME.json")
    parser.add_argument("--settings", default="default,O0,1thread,1thread-O0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metric", default="cpu|compile", help="regex: numbers given ratios")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    settings = opts.settings.split(",")
    load = os.getloadavg()
    out = run(command, settings, opts.rounds, opts.metric)
    out["command"] = "python -m benchmarks.xla_settings " + " ".join(argv)
    out["settings"] = {s: dict(zip(("XLA_FLAGS", "taskset"), SETTINGS[s])) for s in settings}
    out["load_before_after"] = [load, os.getloadavg()]
    out["machine"] = machine()
    for s, ratios in out["ratios_to_default"].items():
        for k, v in ratios.items():
            print(f"{s:11s} {k:60s} {v:6.2f}x  (median {out['medians'][s][k]:.4g})")
    write_json(opts.out or RESULTS_DIR / f"xla_settings-{opts.name}.json", out)
    return out


if __name__ == "__main__":
    main()
