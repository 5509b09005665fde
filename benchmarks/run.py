"""Run the benchmark suite and regenerate the docs page.

    python -m benchmarks.run --full    # make bench: the whole problem set and sweep
    python -m benchmarks.run --quick   # make bench-quick: a few minutes on 2 cores

Each script runs in its own process (the hypergradient sweep spawns one per case).
"""

import argparse
import subprocess
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true")
    group.add_argument("--quick", action="store_true")
    opts = parser.parse_args(argv)
    mode = "full" if opts.full else "quick"
    t0 = time.perf_counter()
    commands = [
        ["forward", "--mode", mode],
        ["many_small", "--mode", mode],
        ["many_small", "--mode", mode, "--form", "map"],
        ["hypergrad", "--mode", mode],
    ]
    if mode == "full":  # the repeated compile-time measurement writes one shared file
        commands.append(["compile_time"])
    for script, *args in commands:
        cmd = [sys.executable, "-m", f"benchmarks.{script}", *args]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.report", "--mode", mode], check=True)
    print(f"benchmarks ({mode}) done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
