"""Smoke test of the benchmark scripts: one tiny case each, so they do not rot.

The scripts run in subprocesses (their own JAX configuration, no strict promotion) and
never import sif2jax. Nothing here looks at a timing.
"""

import functools as ft
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    fwd, hyp = tmp / "forward.json", tmp / "hypergrad.json"
    _run("benchmarks.forward", "--mode", "smoke", "--problems", "rosenbrock-2", "--out", str(fwd))
    methods = "ours-implicit,optimistix-implicit-cg"  # one peer keeps the adapters alive
    _run("benchmarks.hypergrad", "--mode", "smoke", "--methods", methods, "--out", str(hyp))
    ct = tmp / "compile_time.json"
    _run(
        "benchmarks.compile_time",
        *("--n", "4", "--rounds", "2", "--solvers", "lbfgs_implicit,optax", "--out", str(ct)),
    )
    scale = tmp / "scale.json"
    _run(
        "benchmarks.scale",
        *("--n", "64", "--shapes", "matrix", "--dtypes", "float64", "--iters", "3"),
        *("--rounds", "1", "--solvers", "lbfgs_implicit,optax", "--out", str(scale)),
    )
    small = tmp / "many_small.json"
    _run(
        "benchmarks.many_small",
        *("--mode", "smoke", "--tasks", "3", "--solvers", "lbfgs_implicit,optax"),
        *("--out", str(small)),
    )
    small_map = tmp / "many_small_map.json"
    _run(
        "benchmarks.many_small",
        *("--mode", "smoke", "--form", "map", "--tasks", "3", "--solvers", "lbfgs_implicit"),
        *("--out", str(small_map)),
    )
    page = tmp / "benchmarks.md"
    _run(
        "benchmarks.report",
        *("--forward", str(fwd), "--hypergrad", str(hyp), "--compile-time", str(ct)),
        *("--scale", str(scale), "--many-small", str(small), "--page", str(page)),
        *("--many-small-map", str(small_map)),
    )
    fwd, hyp, ct = (json.loads(path.read_text()) for path in (fwd, hyp, ct))
    return fwd, hyp, page, ct


def test_scale_rows(results):
    *_, page, _ = results
    scale = json.loads((page.parent / "scale.json").read_text())
    (case,) = scale["cases"]
    for name in ("lbfgs_implicit", "optax"):
        row = case["solvers"][name]
        # Stopping tests off: every solver runs the iterations it was given.
        assert row["iters"] == 3 and row["evals"] >= 3, name
        # The steady cost comes from a second solve of twice the iterations.
        assert row["long_iters"] == 6 and row["long_evals"] > row["evals"], name
        assert len(row["steady_s"]) == len(row["times_s"]) == 1, name
        assert row["temp_per_n"] > 0, name
    text = page.read_text()
    assert "## Scale: memory and time per iteration" in text
    assert "Steady cost of an iteration: every solver also ran 6 iterations" in text


def test_many_small_rows(results):
    *_, page, _ = results
    small = json.loads((page.parent / "many_small.json").read_text())
    rows = {row["solver"]: row for row in small["rows"]}
    assert set(rows) == {"lbfgs_implicit", "optax"}
    for solver, row in rows.items():
        assert row["error"] is None and row["tasks"] == 3, solver
        # Three starts near (-1.2, 1) of Rosenbrock: each converges within the smoke limit.
        assert row["converged"] == 3 and row["evals"] >= 3 and row["run_s"] > 0, solver
    assert "### Many small problems at once, under `vmap`" in page.read_text()


def test_many_small_map_solves_each_start_as_alone(results):
    # `--form map` solves the starts one after the other; under `vmap` the library keeps
    # each start's own sequence of evaluations, so both forms count the same evaluations.
    *_, page, _ = results
    small = json.loads((page.parent / "many_small.json").read_text())
    small_map = json.loads((page.parent / "many_small_map.json").read_text())
    assert small_map["settings"]["form"] == "map" and "--form map" in small_map["command"]
    (row,) = small_map["rows"]
    (batched,) = [r for r in small["rows"] if r["solver"] == "lbfgs_implicit"]
    assert row["converged"] == 3 and row["iters_max"] == batched["iters_max"]
    assert row["evals"] == batched["evals"]
    text = page.read_text()
    assert "### Many small problems in one program, one after the other (`lax.map`)" in text
    assert text.index("under `vmap`") < text.index("(`lax.map`)")


def test_many_small_ratios_compare_peers_that_converged_as_often():
    from benchmarks.report import many_small_ratios

    def row(run_s, converged):
        return {"run_s": run_s, "converged": converged, "error": None}

    table = {
        # optax is fastest but converged from fewer starts: jaxopt is the reference.
        "A": {"lbfgs_implicit": row(2.0, 60), "optax": row(0.5, 59), "jaxopt": row(4.0, 64)},
        # No peer converged as often: no ratio.
        "B": {"lbfgs_implicit": row(1.0, 64), "optimistix": row(0.1, 16)},
        "C": {"lbfgs_implicit": row(1.0, 64), "optax": row(2.0, 64), "jaxopt": row(0.5, 64)},
    }
    per_problem, per_peer, left_out = many_small_ratios(table)
    assert per_problem == {"A": 0.5, "C": 2.0}
    assert per_peer == {"jaxopt": [0.5, 2.0], "optax": [0.5]}
    assert left_out == ["B"]


def test_forward_rows(results):
    fwd, *_ = results
    rows = {row["solver"]: row for row in fwd["rows"]}
    assert set(rows) == {"lbfgs_implicit", "scipy", "optax", "jaxopt", "optimistix"}
    columns = {"compile_s", "run_s", "iters", "evals", "value", "grad_inf", "converged"}
    for solver, row in rows.items():
        assert row["error"] is None, (solver, row["error"])
        assert columns <= set(row), solver
        assert row["evals"] >= 1 and row["value"] >= 0, solver
    # SciPy and ours reach the minimum f = 0 of Rosenbrock at (1, 1) within the smoke limit.
    assert rows["scipy"]["converged"] and rows["scipy"]["value"] < 1e-10
    assert rows["lbfgs_implicit"]["value"] < 1e-10
    ours = rows["lbfgs_implicit"]
    assert ours["converged"] and ours["grad_inf"] <= fwd["settings"]["gtol"]
    assert ours["evals"] >= ours["iters"] >= 1


def test_hypergrad_rows(results):
    _, hyp, *_ = results
    for block in ("ridge", "logistic"):
        rows = {row["method"]: row for row in hyp[block]["rows"]}
        assert set(rows) == {"ours-implicit", "optimistix-implicit-cg"}
        # Exact implicit differentiation agrees with the closed form / finite differences.
        assert rows["ours-implicit"]["rel_error"] < 1e-5, block
        # Timed in turns: each round's ratio to the first method, itself exactly 1.
        assert rows["ours-implicit"]["total_cpu_vs_first"] == 1.0, block
        assert rows["optimistix-implicit-cg"]["total_vs_first"] > 0, block
    b = hyp["ridge_backward"]
    assert b["cg_converged"] and b["cg_steps_preconditioned"] >= 1
    assert b["rel_error"] < 1e-5
    # Every way of using H_k in the backward CG converges (the smoke run: one problem).
    pre = hyp["preconditioner"]["rows"]
    assert [row["problem"] for row in pre] == ["ridge, 5 common factors"]
    for row in pre:
        counts = [row[k] for k in row if k.endswith(("_Hv", "_zero"))]
        assert len(counts) == 4 and all(c is not None and c >= 1 for c in counts), row
    sweep = hyp["sweep"]["rows"]
    ours = [r for r in sweep if r["method"] == "ours-implicit"]
    assert ours and ours[0]["error"] is None and ours[0]["rel_error"] < 1e-5
    assert ours[0]["peak_rss"] > 0


def test_compile_time_rows(results):
    *_, ct = results
    rows = {row["solver"]: row for row in ct["rows"]}
    assert set(rows) == {"lbfgs_implicit", "optax"} and ct["rounds"] == 2
    for row in rows.values():
        assert len(row["samples_s"]) == 2 and min(row["samples_s"]) == row["min_s"] > 0


def test_report_page(results):
    _, _, page, _ = results
    text = page.read_text()
    assert "python -m benchmarks.compile_time" in text
    headings = ("## Forward solves", "## Hypergradients", "### Scaling sweep")
    for heading in headings + ("### What the L-BFGS preconditioner buys",):
        assert heading in text
    assert (page.parent / "img" / "bench_profile.png").exists()
    assert (page.parent / "img" / "bench_sweep_time.png").exists()


def test_benchmarks_page_is_what_report_renders_from_the_results_files(tmp_path):
    """The committed page's numbers come from `benchmarks/results/`: a results file
    re-run, or a page edited by hand, without `python -m benchmarks.report` fails here."""
    page = tmp_path / "benchmarks.md"
    _run("benchmarks.report", "--page", str(page))
    committed = (ROOT / "docs" / "pages" / "benchmarks.md").read_text()
    assert page.read_text() == committed, (
        "docs/pages/benchmarks.md is not what `python -m benchmarks.report` renders from "
        "benchmarks/results/: run it and commit the page"
    )


def test_history_forms_reports_both_forms(tmp_path):
    args = ("--sizes", "2,40", "--repeats", "1", "--out", str(tmp_path / "history_forms.json"))
    out = _run("benchmarks.history_forms", *args).stdout
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("n=")]
    assert [row[0] for row in rows] == ["n=2", "n=40"]
    for row in rows:
        two_loop, compact = float(row[2]), float(row[4])
        assert row[1] == "two-loop" and row[3] == "compact" and two_loop > 0 and compact > 0
    saved = json.loads((tmp_path / "history_forms.json").read_text())["rows"]
    assert [row["n"] for row in saved] == [2, 40]


def test_projections_times_both_ways(tmp_path):
    saved = tmp_path / "projections.json"
    args = ("--sizes", "100", "--rounds", "1", "--inner", "2", "--out", str(saved))
    _run("benchmarks.projections", *args)
    (row,) = json.loads(saved.read_text())["rows"]
    assert row["n"] == 100 and row["two_us"] > 0 and row["stacked_us"] > 0


def test_closure_compile_reports_both_ways(tmp_path):
    saved = tmp_path / "closure_compile.json"
    out = _run("benchmarks.closure_compile", "--sizes", "1000", "--out", str(saved)).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("n=")]
    found = re.search(r"n=\s*1000 .*args\s+([\d.]+) s, closed over\s+([\d.]+) s", line)
    assert found, line
    assert float(found.group(1)) > 0 and float(found.group(2)) > 0, line
    assert [row["n"] for row in json.loads(saved.read_text())["rows"]] == [1000]


def test_first_step_solves_each_problem_with_both_rules(tmp_path):
    out = tmp_path / "first_step.json"
    _run("benchmarks.first_step", "--mode", "smoke", "--out", str(out))
    payload = json.loads(out.read_text())
    assert [(r["problem"], r["rule"]) for r in payload["rows"]] == [
        (name, rule) for name in ("rosenbrock-2", "logreg-breast-cancer") for rule in ("l2", "max")
    ]
    assert all(r["converged"] and r["evals"] > 0 for r in payload["rows"])
    assert payload["both_converged"]["problems"] == 2


def test_compile_mlp_split_adds_up_and_counts_the_program(tmp_path):
    out = tmp_path / "compile_mlp.json"
    args = ("--rounds", "1", "--tasks", "2", "--solvers", "unrolled_gd", "--split")
    stdout = _run("benchmarks.compile_mlp", *args, "--out", str(out)).stdout
    rows = json.loads(out.read_text())["rows"]
    assert sorted(row["tasks"] for row in rows) == [1, 2]
    for row in rows:
        stages = [row[f"{stage}_cpu_median_s"] for stage in ("trace", "lower", "xla")]
        assert all(s > 0 for s in stages) and sum(stages) == pytest.approx(row["cpu_median_s"])
        # The unrolled loop's program: two while loops (forward, backward) and a few
        # dozen kernels around them.
        assert row["stablehlo_ops"] > row["kernels"] > 20, row
    assert "| unrolled_gd | 2 |" in stdout


def test_kernels_counts_fusions_and_loops_not_bookkeeping():
    import jax
    import jax.numpy as jnp
    from benchmarks.compile_mlp import kernels

    x = jnp.ones(3)
    elementwise = jax.jit(lambda x, y: jnp.sin(x) * y + 1).lower(x, x).compile()
    body = lambda i, v, y: jnp.sin(v) * y  # noqa: E731
    loop = jax.jit(lambda x, y: jax.lax.fori_loop(0, 3, ft.partial(body, y=y), x))
    # One fusion; the loop adds its own instruction, copies of its carry, and the
    # kernels of its body and condition.
    assert kernels(elementwise) == 1
    assert kernels(loop.lower(x, x).compile()) > 3


def test_xla_settings_runs_each_setting_in_its_own_process(tmp_path):
    out = tmp_path / "xla_settings.json"
    forward = ("benchmarks.forward", "--mode", "smoke", "--problems", "rosenbrock-2")
    _run(
        "benchmarks.xla_settings",
        *("--name", "smoke", "--rounds", "1", "--settings", "default,1thread-O0"),
        *("--out", str(out), "--", *forward, "--solvers", "lbfgs_implicit"),
    )
    data = json.loads(out.read_text())
    assert data["settings"]["1thread-O0"]["XLA_FLAGS"].endswith("optimization_level=0")
    key = "rows/lbfgs_implicit,rosenbrock-2,2/run_cpu_s"
    for setting in ("default", "1thread-O0"):
        assert data["medians"][setting][key] > 0 and data["medians"][setting]["process_cpu_s"] > 0
    assert data["ratios_to_default"]["default"][key] == 1.0


def test_per_problem_ratios_take_the_fastest_peer_that_converged():
    from benchmarks.report import per_problem_ratios

    def row(run_s, converged=True):
        return {"run_s": run_s, "converged": converged, "error": None}

    table = {
        # optax is faster but did not converge: jaxopt is the reference.
        "A": {"lbfgs_implicit": row(2.0), "optax": row(0.5, False), "jaxopt": row(4.0)},
        "B": {"lbfgs_implicit": row(1.0, False), "optimistix": row(1.0)},
        "C": {"lbfgs_implicit": row(1.0), "scipy": row(0.1)},  # no JAX peer solved it
    }
    out = per_problem_ratios(table)
    assert out == {
        "ratios": {"A": 0.5},
        "unsolved": ["B"],
        "higher": {},
        "lower": {},
        "fastest": {"A": "jaxopt"},
    }


def test_per_problem_ratios_leave_out_peers_that_stopped_higher():
    from benchmarks.report import per_problem_ratios

    def row(run_s, value):
        return {"run_s": run_s, "converged": True, "error": None, "value": value}

    table = {
        # jaxopt stopped fast on a plateau far above our value: optimistix is the reference.
        "A": {
            "lbfgs_implicit": row(2.0, 124.36),
            "jaxopt": row(0.1, 2020.0),
            "optimistix": row(1.0, 124.36 + 1e-3),
        },
        # A peer that found a lower value stays in, and is the reference.
        "B": {"lbfgs_implicit": row(1.0, 16.0), "jaxopt": row(4.0, 1.0)},
        # Only a higher peer: no ratio.
        "C": {"lbfgs_implicit": row(1.0, 0.0), "optax": row(0.5, 1.0)},
    }
    out = per_problem_ratios(table)
    assert out["ratios"] == {"A": 2.0, "B": 0.25}
    assert out["higher"] == {"A": [("jaxopt", 2020.0, 124.36)], "C": [("optax", 1.0, 0.0)]}
    assert out["lower"] == {"B": [("jaxopt", 1.0, 16.0)]}


def test_above_lines_split_evaluations_from_time_per_evaluation():
    from benchmarks.report import _above_lines, per_problem_ratios

    def row(run_s, evals, iters, flops):
        return {
            "run_s": run_s,
            "converged": True,
            "error": None,
            "n": 3,
            "evals": evals,
            "iters": iters,
            "xla_flops": flops,
        }

    table = {
        # jaxopt's count has one value-only evaluation per iteration: 30 - 10 = 20 of ours.
        "P": {"lbfgs_implicit": row(3.0, 40, 30, 1200.0), "jaxopt": row(1.0, 30, 10, 800.0)},
    }
    per = per_problem_ratios(table)
    lines = _above_lines(table, per, [("P", per["ratios"]["P"])])
    assert lines[-2] == "| P | 3 | jaxopt | 3.00 | 40 / 20 | 1.50 | 1,200 / 800 |"
    assert _above_lines(table, per, []) == []
