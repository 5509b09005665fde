"""Timing, platform and I/O helpers shared by the benchmark scripts."""

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax


RESULTS_DIR = Path(__file__).parent / "results"


def setup() -> None:
    """Float64 everywhere: the protocol compares solvers at double precision."""
    jax.config.update("jax_enable_x64", True)


def block(tree):
    return jax.block_until_ready(tree)


def compile_jit(fn, *args):
    """`jax.jit(fn)` traced, lowered and compiled for `args`; returns (compiled, seconds).

    Timing trace + lower + compile separately keeps compilation out of the run times.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_call(fn, *args, repeats: int = 5):
    """Median wall seconds of `fn(*args)` over `repeats` warm runs, and the last output.

    One untimed call first, so caches and allocators are warm; every timed call ends
    with `jax.block_until_ready`, so asynchronous dispatch cannot hide work.
    """
    wall, _, out = time_call_cpu(fn, *args, repeats=repeats)
    return wall, out


def time_call_cpu(fn, *args, repeats: int = 5):
    """`time_call` with this process's CPU seconds too: `(wall, cpu, output)`, medians.

    On a shared machine CPU seconds move less with load than wall seconds; XLA:CPU's
    threads count in both.
    """
    out = block(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = block(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "lbfgs_implicit",
                "jax",
                "equinox",
                "lineax",
                "optax",
                "jaxopt",
                "optimistix",
                "scipy",
                "sif2jax",
            )
        },
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
    }


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def write_json(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")


def write_results(path, program: str, argv, rows, **fields) -> None:
    """Write a results file: the command that made it (`program` followed by `argv`, or
    by this process's arguments when `argv` is None), `fields`, the machine and `rows`."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": f"{program} {arguments}".strip(), **fields}
    write_json(path, {**payload, "machine": machine(), "rows": rows})
    print(f"wrote {path}")


def _jsonable(obj):
    try:
        return float(obj)
    except TypeError:
        return str(obj)
