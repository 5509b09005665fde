"""Run every example script in its quick mode; each one asserts its own result.

The scripts run in subprocesses, so the test session's configuration (x64, strict dtype
promotion, warnings as errors, 8 simulated devices) does not leak into them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = [
    "quickstart",
    "meta_learning",
    "optimisation_layer",
    "bilevel",
    "spectral_unmixing",
    "newton_hyperparameters",
]


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_quick(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["MPLBACKEND"] = "Agg"
    # The package of this checkout, not whichever one the environment installed (a
    # worktree or a copy tested with another checkout's virtualenv).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", f"--plot-dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        # A guard against a hung example, not a speed test: `optimisation_layer --quick`
        # took over 300 s on jax 0.12 with both CI legs sharing 2 cores.
        timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert (tmp_path / f"{name}.png").stat().st_size > 0
