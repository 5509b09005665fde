"""Write `docs/pages/benchmarks.md` and its plots from `benchmarks/results/*.json`.

    python -m benchmarks.report [--mode full|quick]

Uses the full results when present (`--mode` picks); every number on the page comes
from those files, which say the command and machine that produced them.
"""

import argparse
import json
import math
from pathlib import Path

from ._common import RESULTS_DIR


ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "pages" / "benchmarks.md"
OURS = "lbfgs_implicit"
JAX_PEERS = ("optax", "jaxopt", "optimistix")
PEERS = ("scipy",) + JAX_PEERS
EXACT = ("ours-implicit", "jaxopt-implicit", "optimistix-implicit", "optimistix-implicit-cg")


def _rel(path):
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


def _load(kind, mode):
    modes = [mode] if mode else ["full", "quick"]
    for m in modes:
        path = RESULTS_DIR / f"{kind}-{m}.json"
        if path.exists():
            return json.loads(path.read_text()), path
    return None, None


def _geomean(xs):
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _ms(s):
    if s is None or not math.isfinite(s):
        return "–"
    ms = 1e3 * s
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _met(ok):
    return "**met**" if ok else "**missed**"


def _by_problem(rows):
    table = {}
    for row in rows:
        if "solver" in row:
            table.setdefault(row["problem"], {})[row["solver"]] = row
    return table


def _solved(row):
    return bool(row and row.get("converged") and row.get("error") is None)


def forward_summary(fwd):
    table = _by_problem(fwd["rows"])
    solvers = [OURS] + [p for p in PEERS if any(p in r for r in table.values())]
    summary = {"solved": {}, "time_ratio": {}, "eval_ratio_scipy": None, "both": {}}
    for s in solvers:
        summary["solved"][s] = sum(_solved(r.get(s)) for r in table.values())
    for peer in solvers[1:]:
        both = [p for p, r in table.items() if _solved(r.get(OURS)) and _solved(r.get(peer))]
        ratios = [table[p][OURS]["run_s"] / table[p][peer]["run_s"] for p in both]
        summary["time_ratio"][peer] = _geomean(ratios)
        summary["both"][peer] = len(both)
        if peer == "scipy":
            ev = [table[p][OURS]["evals"] / table[p][peer]["evals"] for p in both]
            summary["eval_ratio_scipy"] = _geomean(ev)
            summary["eval_total_scipy"] = sum(table[p][OURS]["evals"] for p in both) / max(
                sum(table[p][peer]["evals"] for p in both), 1
            )
    summary["missed_vs_scipy"] = [
        p for p, r in table.items() if _solved(r.get("scipy")) and not _solved(r.get(OURS))
    ]
    summary["per_problem"] = per_problem_ratios(table)
    if all("run_cpu_s" in row for r in table.values() for row in r.values() if _solved(row)):
        summary["per_problem_cpu"] = per_problem_ratios(table, "run_cpu_s")
    return table, solvers, summary


# Final values farther apart than this, relative to 1 + |ours|, are different answers.
VALUE_TOL = 1e-4


def _higher(row, ours):
    """Whether `row` stopped at a value above our final value (a different, worse answer)."""
    f, f_ours = row.get("value"), ours.get("value")
    if f is None or f_ours is None:
        return False
    return f - f_ours > VALUE_TOL * (1 + abs(f_ours))


def per_problem_ratios(table, key="run_s"):
    """Our time over the fastest JAX peer that converged to our answer or a better one.

    `key` picks the time: `run_s` (wall median) or `run_cpu_s` (CPU median). `ratios`
    covers the problems both we and at least one JAX peer solved; `unsolved` names those
    a JAX peer solved and we did not (no finite ratio exists for them). Converged means a
    small gradient, which a flat region also has: a peer whose final value is above ours
    by more than `VALUE_TOL (1 + |f|)` found a worse point, and its time is not compared
    (`higher`: problem -> [(peer, its value, ours)]); `lower` lists the peers that found
    a better one, which stay in the comparison.
    """
    ratios, unsolved, higher, lower, fastest = {}, [], {}, {}, {}
    for p, r in table.items():
        solved = [s for s in JAX_PEERS if _solved(r.get(s))]
        if not solved:
            continue
        if not _solved(r.get(OURS)):
            unsolved.append(p)
            continue
        ours = r[OURS]
        for s in solved:
            if _higher(r[s], ours):
                higher.setdefault(p, []).append((s, r[s]["value"], ours["value"]))
            elif _higher(ours, r[s]):
                lower.setdefault(p, []).append((s, r[s]["value"], ours["value"]))
        peers = [s for s in solved if not _higher(r[s], ours)]
        if peers:
            fastest[p] = min(peers, key=lambda s: r[s][key])
            ratios[p] = ours[key] / r[fastest[p]][key]
    return {
        "ratios": ratios,
        "unsolved": unsolved,
        "higher": higher,
        "lower": lower,
        "fastest": fastest,
    }


def _vg_evals(row, solver):
    """Value-and-gradient evaluations of a results row (jaxopt's count also has one
    value-only evaluation per iteration)."""
    return row["evals"] - row["iters"] if solver == "jaxopt" else row["evals"]


# XLA:CPU runs a program whose cost estimate is below this many flops on the calling
# thread, and hands a larger one to a worker thread (the FAQ's "Many tiny solves").
INLINE_FLOPS = 1000


def _above_lines(table, per, above):
    """Where each problem above 1.2x the fastest peer loses: evaluations (a different
    path) or time per evaluation, and whether our program and the peer's fall on either
    side of XLA:CPU's inline line."""
    if not above:
        return []
    lines = [
        "Where the problems above 1.2x lose: more evaluations than the fastest peer (a "
        "different path to the minimum) or more time per evaluation. A program whose "
        f"cost estimate (XLA's flops, `xla_flops` in the results file) is {INLINE_FLOPS} or "
        "more is handed from the calling thread to a worker thread, below the line it runs "
        "on the calling thread; the FAQ's *Many tiny solves called one by one on CPU* "
        "measures what the hand-off costs a call.",
        "",
        "| problem | n | fastest peer | time, ours / peer | evaluations, ours / peer | "
        "time per evaluation, ours / peer | program flops, ours / peer |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for p, x in above:
        peer = per["fastest"][p]
        ours_row, peer_row = table[p][OURS], table[p][peer]
        e_ours, e_peer = _vg_evals(ours_row, OURS), _vg_evals(peer_row, peer)
        per_eval = (ours_row["run_s"] / e_ours) / (peer_row["run_s"] / e_peer)
        flops = [r.get("xla_flops") for r in (ours_row, peer_row)]
        flop_text = " / ".join("-" if f is None else f"{f:,.0f}" for f in flops)
        lines.append(
            f"| {p} | {ours_row['n']} | {peer} | {x:.2f} | {e_ours} / {e_peer} | "
            f"{per_eval:.2f} | {flop_text} |"
        )
    return lines + [""]


def _answers_note(per):
    """Sentences naming the problems where a converged peer's final value is not ours."""

    def listed(found):
        return "; ".join(
            f"{p}: " + ", ".join(f"{s} {f:.6g}" for s, f, _ in rows) + f" (ours {rows[0][2]:.6g})"
            for p, rows in found.items()
        )

    out = []
    if per.get("higher"):
        out.append(
            "Left out of the per-problem comparison, as converged (a small gradient) to a "
            f"higher value than ours by more than {VALUE_TOL:g} (1 + |f|): "
            + listed(per["higher"])
            + "."
        )
    if per.get("lower"):
        out.append(
            "Converged to a lower value than ours (kept in the comparison): "
            + listed(per["lower"])
            + "."
        )
    return [" ".join(out), ""] if out else []


def profile_plot(table, solvers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [2 ** (k / 8) for k in range(0, 8 * 12 + 1)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    problems = list(table)
    for s in solvers:
        ratios = []
        for p in problems:
            best = min((r["run_s"] for r in table[p].values() if _solved(r)), default=float("nan"))
            row = table[p].get(s)
            ratios.append(row["run_s"] / best if _solved(row) else float("inf"))
        frac = [sum(r <= t for r in ratios) / len(problems) for t in taus]
        ax.step(taus, frac, where="post", label=s, lw=2 if s == OURS else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("τ (time within a factor τ of the fastest solver)")
    ax.set_ylabel("fraction of problems solved")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Performance profile, forward set (float64)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_plots(rows, time_path, mem_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    for key, path, label in (
        ("total_s", time_path, "seconds, jax.value_and_grad of the outer loss"),
        ("peak_rss", mem_path, "peak RSS of the process (GiB)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in methods:
            pts = [(r["n"], r[key]) for r in rows if r["method"] == m and not r.get("error")]
            if key == "peak_rss":
                pts = [(n, v / 2**30) for n, v in pts]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", label=m, lw=2 if m == "ours-implicit" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner dimension n")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _machine_line(payload):
    m = payload["machine"]
    v = m["versions"]
    vs = ", ".join(f"{k} {val}" for k, val in v.items())
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['device']}; {vs}"


def forward_section(fwd, path, lines, compile_time=None):
    table, solvers, summ = forward_summary(fwd)
    settings = fwd["settings"]
    lines += [
        "## Forward solves",
        "",
        f"Command: `{fwd['command']}` (results: `{_rel(path)}`, "
        f"{fwd.get('wall_s', 0) / 60:.1f} min). Machine: {_machine_line(fwd)}.",
        "",
        f"Float64. Converged means $\\|\\nabla f\\|_\\infty \\le$ {settings['gtol']:g} at the "
        "returned point, recomputed by one jitted gradient for every solver. "
        f"Memory {settings['history']} pairs, at most {settings['max_steps']} iterations, "
        "median of warm runs, the solvers of a problem taking turns over five rounds of "
        f"consecutive runs, each run at least {settings['repeats']} times and until its "
        f"runs add up to {settings['min_seconds']:g} s (at most {settings['max_repeats']} "
        "runs). Settings mapping:",
        "",
        "| solver | how it is told to stop |",
        "| --- | --- |",
        f"| lbfgs_implicit | `LBFGS(gtol={settings['gtol']:g})` (infinity norm) |",
        f"| SciPy L-BFGS-B | `gtol={settings['gtol']:g}`, `ftol=0`, `maxcor=10`, jitted "
        "value-and-grad; time includes the host round trip per evaluation |",
        "| optax.lbfgs | jitted `lax.while_loop` with its zoom line search, stopped by us at "
        f"$\\|g\\|_\\infty \\le$ {settings['gtol']:g} (optax has no stopping rule) |",
        f"| jaxopt.LBFGS | `tol={settings['gtol']:g}` on its test, the gradient 2-norm |",
        "| optimistix.LBFGS | no gradient test exists; Cauchy test on steps and values, "
        f"`rtol=atol={settings['optimistix_rtol_atol']:g}` |",
        "",
        "### Summary",
        "",
        "| solver | problems solved | our time / theirs (geo. mean, both solved) |"
        " problems both solved |",
        "| --- | --- | --- | --- |",
    ]
    total = len(table)
    lines.append(f"| {OURS} | {summ['solved'][OURS]} / {total} | 1 | – |")
    for s in solvers[1:]:
        lines.append(
            f"| {s} | {summ['solved'][s]} / {total} | {summ['time_ratio'][s]:.2f} | "
            f"{summ['both'][s]} |"
        )
    lines += [
        "",
        f"Evaluations, ours / SciPy's, geometric mean over problems both solved: "
        f"**{summ['eval_ratio_scipy']:.2f}** (total over those problems: "
        f"{summ['eval_total_scipy']:.2f}).",
        "",
    ]
    jax_ratios = {s: summ["time_ratio"][s] for s in JAX_PEERS if s in summ["time_ratio"]}
    worst = max(jax_ratios.values()) if jax_ratios else float("nan")
    best_peer = max(jax_ratios, key=jax_ratios.get) if jax_ratios else "–"
    missed = summ["missed_vs_scipy"]
    per = summ["per_problem"]
    per_geo = _geomean(list(per["ratios"].values()))
    above = sorted(((p, x) for p, x in per["ratios"].items() if x > 1.2), key=lambda px: -px[1])
    above_text = ", ".join(f"{p} {x:.2f}" for p, x in above) or "none"
    per_cpu = summ.get("per_problem_cpu")
    cpu_text = (
        f" wall ({_geomean(list(per_cpu['ratios'].values())):.2f}x on CPU seconds)"
        if per_cpu
        else ""
    )
    if per["unsolved"]:
        above_text += "; solved by a JAX peer, not by us: " + ", ".join(per["unsolved"])
    lines += [
        "### Targets",
        "",
        "| target | result | |",
        "| --- | --- | --- |",
        f"| solve every problem SciPy solves | "
        f"{'all' if not missed else 'not solved: ' + ', '.join(missed)} | {_met(not missed)} |",
        f"| per peer: geometric-mean time at most 0.8x each JAX peer's | {worst:.2f}x against "
        f"{best_peer} (the peer we are slowest against) | {_met(worst <= 0.8)} |",
        f"| per problem, against the fastest JAX peer that solved it (to our value or a "
        f"lower one): geometric mean "
        f"at most 0.8x over the {len(per['ratios'])} problems both solved | "
        f"{per_geo:.2f}x{cpu_text} | "
        f"{_met(per_geo <= 0.8)} |",
        f"| per problem: none above 1.2x the fastest JAX peer | above: {above_text} | "
        f"{_met(not above and not per['unsolved'])} |",
        f"| evaluations at most 1.1x SciPy's | {summ['eval_ratio_scipy']:.2f}x | "
        f"{_met(summ['eval_ratio_scipy'] <= 1.1)} |",
        "",
    ]
    lines += _above_lines(table, per, above)
    lines += _answers_note(per)
    lines += [
        "![performance profile](img/bench_profile.png)",
        "",
    ]
    acceptance_a(table, lines, compile_time)
    lines += [
        "### Every problem",
        "",
        "Warm median milliseconds / value-and-gradient evaluations; ✗ = not converged "
        "(final $\\|g\\|_\\infty$ in the results file). jaxopt's count is its "
        "`num_fun_eval`, which also counts one evaluation of the value alone per iteration "
        "(its zoom search's set-up evaluates `fun` again): its value-and-gradient "
        "evaluations are its count less its iterations (`iters` in the results file).",
        "",
        "| problem | n | " + " | ".join(solvers) + " |",
        "| --- | --- | " + " | ".join("---" for _ in solvers) + " |",
    ]
    for p, r in table.items():
        cells = []
        for s in solvers:
            row = r.get(s)
            if row is None or row.get("error"):
                cells.append("error")
            else:
                mark = "" if _solved(row) else " ✗"
                cells.append(f"{_ms(row['run_s'])} / {row['evals']}{mark}")
        n = next(iter(r.values()))["n"]
        lines.append(f"| {p} | {n} | " + " | ".join(cells) + " |")
    compile_cells = []
    for s in solvers:
        cs = sorted(r[s]["compile_s"] for r in table.values() if s in r and "compile_s" in r[s])
        compile_cells.append(f"{cs[len(cs) // 2]:.2f}" if cs else "–")
    lines += [
        "",
        "Median compile seconds (trace + lower + compile; SciPy: its jitted value-and-grad): "
        + ", ".join(f"{s} {c}" for s, c in zip(solvers, compile_cells))
        + ".",
        "",
    ]


def acceptance_a(table, lines, compile_time=None):
    lines += [
        "### Rosenbrock n = 1000 and logistic regression (float64)",
        "",
        "| problem | ours (ms) | optax | jaxopt | optimistix | ours / optax | ours / jaxopt |"
        " ours / optimistix | our evals / SciPy's | our compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in ("rosenbrock-1000", "logreg-breast-cancer"):
        r = table.get(p)
        if not r or OURS not in r or r[OURS].get("error"):
            continue
        o = r[OURS]
        cells = [_ms(r[s]["run_s"]) if s in r and "run_s" in r[s] else "–" for s in JAX_PEERS]
        ratios = [
            f"{o['run_s'] / r[s]['run_s']:.2f}" if s in r and "run_s" in r[s] else "–"
            for s in JAX_PEERS
        ]
        ev = f"{o['evals']} / {r['scipy']['evals']}" if "scipy" in r else "–"
        lines.append(
            f"| {p} | {_ms(o['run_s'])} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ratios)
            + f" | {ev} | {o['compile_s']:.2f} |"
        )
    r = table.get("rosenbrock-1000", {}).get(OURS)
    if compile_time:
        ct, ct_path = compile_time
        rows = {row["solver"]: row for row in ct["rows"]}
        ours = rows.get(OURS)
        peers = ", ".join(
            f"{name} {row['median_s']:.2f} s" for name, row in rows.items() if name != OURS
        )
        if ours:
            lines += [
                "",
                f"Compile time for {ct['problem']} (target < 1 s), median of {ct['rounds']} "
                f"compiles taken in turns with the peers (`{ct['command'].strip()}`, "
                f"results: `{_rel(ct_path)}`): **{ours['median_s']:.2f} s** "
                f"(min {ours['min_s']:.2f} s), {_met(ours['median_s'] < 1)}; {peers}.",
            ]
    if r and "compile_s" in r:
        lines += [
            "",
            f"The single compile of Rosenbrock n = 1000 in the forward run above: "
            f"{r['compile_s']:.2f} s.",
        ]
    lines.append("")


_INTERLEAVED = (
    " In the next two tables the methods are compiled first and then timed in turns, round"
    " after round (each method's time is the median over the rounds; a ratio is the median of"
    " each round's ratio); the scaling sweep runs each case in its own process, one after"
    " another."
)


def _paired(hyp):
    blocks = [hyp[k] for k in ("ridge", "logistic") if k in hyp]
    return any("total_cpu_vs_first" in r for b in blocks for r in b["rows"])


def _hyper_table(block, lines):
    rows = block["rows"]
    # Files written before the timing was interleaved have no per-round ratios.
    paired = any("total_cpu_vs_first" in r for r in rows)
    first = rows[0]["method"]
    ratio_head = f" value_and_grad / {first}: wall, CPU (CPU's range) |" if paired else ""
    run_by = ""
    if "command" in block:
        run_by = f" This table was run by `{block['command']}`."
    lines += [
        f"Reference: {block['reference']}.{run_by}",
        "",
        "| method | relative error | value_and_grad (ms) |"
        f"{ratio_head} backward share | compile (s) |",
        "| --- | --- | --- |" + (" --- |" if paired else "") + " --- | --- |",
    ]
    for r in rows:
        if r.get("error"):
            blank = " |" * (4 if paired else 3)
            lines.append(f"| {r['method']} | {r['error'][:80]} |{blank}")
            continue
        ratio = ""
        if paired:
            spread = r.get("total_cpu_vs_first_range")
            spread = f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
            ratio = f" {r['total_vs_first']:.2f}, {r['total_cpu_vs_first']:.2f}{spread} |"
        lines.append(
            f"| {r['method']} | {r['rel_error']:.1e} | {_ms(r['total_s'])} |{ratio} "
            f"{r['backward_share']:.0%} | {r['compile_s']:.2f} |"
        )
    lines.append("")


def hyper_section(hyp, path, lines):
    lines += [
        "## Hypergradients",
        "",
        f"Command: `{hyp['command']}` (results: `{_rel(path)}`, "
        f"{hyp.get('wall_s', 0) / 60:.1f} min). Machine: {_machine_line(hyp)}.",
        "",
        "Each library runs its own forward L-BFGS (ours `gtol="
        f"{hyp['settings']['forward']['gtol']:g}`, jaxopt `tol="
        f"{hyp['settings']['forward']['jaxopt_tol']:g}`, optimistix `rtol=atol="
        f"{hyp['settings']['forward']['optimistix_rtol_atol']:g}`), so errors include the "
        "forward solve's. `ours-quasinewton` is approximate by design; `unrolled` is reverse "
        "mode through optimistix's loop (`RecursiveCheckpointAdjoint`). Backward share = "
        "(value_and_grad time - forward time) / value_and_grad time."
        + (_INTERLEAVED if _paired(hyp) else ""),
        "",
    ]
    if "ridge" in hyp:
        lines += [f"### Ridge regression, n = {hyp['ridge']['n']}", ""]
        _hyper_table(hyp["ridge"], lines)
    if "logistic" in hyp:
        lines += [
            f"### Per-feature L2 logistic regression (breast cancer, n = {hyp['logistic']['n']},"
            " 30 hyperparameters)",
            "",
        ]
        _hyper_table(hyp["logistic"], lines)
    if "ridge_backward" in hyp:
        b = hyp["ridge_backward"]
        lines += [
            f"### Ridge regression, n = {b['n']}: backward against forward",
            "",
            "Our backward time is the pullback of `jax.vjp(outer_loss, theta)` alone (jitted),"
            " the forward time `optimize` alone. optimistix differentiates by a custom JVP, "
            "so its linear solve runs in the forward half of `jax.vjp`; its backward is "
            "therefore value_and_grad minus its forward solve, and compared with ours "
            "measured the same way. CG steps are counted by calling `ImplicitAdjoint.solve` "
            "on the Hessian at the solution and the forward L-BFGS memory, as the backward "
            "pass does." + (f" This case was run by `{b['command']}`." if "command" in b else ""),
            "",
            "| quantity | value | target | |",
            "| --- | --- | --- | --- |",
            f"| our backward / our forward | {b['backward_over_forward']:.2f} "
            f"({_ms(b['backward_s'])} ms / {_ms(b['forward_s'])} ms) | <= 0.5 | "
            f"{_met(b['backward_over_forward'] <= 0.5)} |",
            f"| optimistix default backward / ours | {b['optimistix_backward_over_ours']:.2f}x"
            f" ({_ms(b['optimistix_backward_s'])} ms / "
            f"{_ms(b.get('ours_total_minus_forward_s'))} ms) | >= 10x | "
            f"{_met(b['optimistix_backward_over_ours'] >= 10)} |",
            f"| CG steps, no preconditioner / L-BFGS preconditioner | {b['cg_ratio']:.2f} "
            f"({b['cg_steps_plain']} / {b['cg_steps_preconditioned']}) | >= 2 | "
            f"{_met(b['cg_ratio'] >= 2)} |",
            f"| relative error, ours / optimistix default | {b['rel_error']:.1e} / "
            f"{b['optimistix_rel_error']:.1e} | | |",
            "",
        ]
    if "preconditioner" in hyp:
        preconditioner_block(hyp["preconditioner"], lines)
    if "sweep" in hyp:
        sweep_block(hyp["sweep"], lines)


def preconditioner_block(pre, lines):
    def steps(value):
        return "failed" if value is None else str(value)

    lines += [
        "### What the L-BFGS preconditioner buys",
        "",
        "Backward CG steps to the default tolerance on $H w = v$ at the solution, with "
        "the forward pass's $H_k$ used as preconditioner and start, as neither, or as one "
        "of the two. Command: "
        f"`{pre['command']}`.",
        "",
        "| problem | n | forward steps | $H_k$ both | plain from 0 | "
        "plain from $H_k v$ | $H_k$ from 0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in pre["rows"]:
        lines.append(
            f"| {r['problem']} | {r['n']} | {r['forward_steps']} | "
            f"{steps(r['preconditioned_from_Hv'])} | {steps(r['plain_from_zero'])} | "
            f"{steps(r['plain_from_Hv'])} | {steps(r['preconditioned_from_zero'])} |"
        )
    lines += [
        "",
        "The default ten pairs describe $H$ in at most ten directions. Where CG needs many more "
        "steps than that (a spread spectrum), they save a few steps at most; where a "
        "few eigenvalues stand far above the rest, the last pairs of a long forward "
        "solve describe the bulk, not those directions, and preconditioning by $H_k$ "
        "can cost steps: $H_k$ keeps only its newest pair's secant equation. Hence the "
        "default builds one BFGS update by all pairs at once instead, preconditions by it "
        "only where its start shows that it describes $H$, and uses the memory at all "
        "only where a product with it is estimated to cost at most a tenth of a "
        "Hessian-vector product, else runs plain CG from zero (the adjoints page, 'What "
        "the L-BFGS memory saves in the backward pass'); "
        "`python -m benchmarks.preconditioner` times the choices.",
        "",
    ]


def sweep_block(sweep, lines):
    rows = sweep["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = sorted({r["n"] for r in rows})
    cell = {(r["method"], r["n"]): r for r in rows}
    lines += [
        "### Scaling sweep",
        "",
        f"Problem: {sweep['problem']}; exact hypergradient from a banded direct solve. Each "
        f"case runs in its own process, time limit {sweep['timeout_s']} s, address space "
        f"capped at {sweep['mem_limit_bytes'] / 2**30:.0f} GiB; failures are results.",
        "",
        "value_and_grad milliseconds (relative error, peak RSS GiB):",
        "",
        "| n | " + " | ".join(methods) + " |",
        "| --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for n in sizes:
        cells = []
        for m in methods:
            r = cell.get((m, n))
            if r is None:
                cells.append("–")
            elif r.get("error"):
                cells.append(r.get("status", "error"))
            else:
                cells.append(
                    f"{_ms(r['total_s'])} ({r['rel_error']:.0e}, {r['peak_rss'] / 2**30:.1f})"
                )
        lines.append(f"| {n:g} | " + " | ".join(cells) + " |")
    lines += ["", "![hypergradient time](img/bench_sweep_time.png)", ""]
    lines += ["![hypergradient memory](img/bench_sweep_memory.png)", ""]
    # Targets: fastest and most accurate at every n; only exact method at the largest n.
    fastest_all, accurate_all = True, True
    notes = []
    for n in sizes:
        ok = [cell[(m, n)] for m in methods if (m, n) in cell and not cell[(m, n)].get("error")]
        if not ok:
            continue
        ours = cell.get(("ours-implicit", n))
        if ours is None or ours.get("error"):
            fastest_all = accurate_all = False
            notes.append(f"n={n:g}: ours-implicit failed")
            continue
        peers = [r for r in ok if not r["method"].startswith("ours")]
        exact_ok = [r for r in ok if r["method"] != "ours-quasinewton"]
        accurate = min(exact_ok, key=lambda r: r["rel_error"])
        fastest = min(peers, key=lambda r: r["total_s"]) if peers else None
        if fastest is not None and fastest["total_s"] < ours["total_s"]:
            fastest_all = False
            notes.append(
                f"n={n:g}: {fastest['method']} is faster than ours-implicit "
                f"({_ms(fastest['total_s'])} ms vs {_ms(ours['total_s'])} ms, at relative "
                f"error {fastest['rel_error']:.0e} against our {ours['rel_error']:.0e})"
            )
        if accurate["method"] != "ours-implicit":
            accurate_all = False
            notes.append(
                f"n={n:g}: most accurate is {accurate['method']} "
                f"({accurate['rel_error']:.1e} vs our {ours['rel_error']:.1e})"
            )
    top = sizes[-1] if sizes else None
    reach = [m for m in EXACT if (m, top) in cell and not cell[(m, top)].get("error")]
    only = reach == ["ours-implicit"]
    lines += [
        "Targets:",
        "",
        f"- ours-implicit faster than every peer at every n: {_met(fastest_all)} "
        "(ours-quasinewton, approximate, is faster still)",
        f"- most accurate at every n (among the exact methods and unrolled): {_met(accurate_all)}",
        f"- the only exact (CG) backward that reaches n = {top:g}: {_met(only)} "
        f"(exact methods that ran: {', '.join(reach) or 'none'})",
    ]
    if notes:
        lines += ["", "Where we fall short: " + "; ".join(notes) + "."]
    big = cell.get(("ours-implicit", top))
    if big and not big.get("error"):
        lines += [
            "",
            f"At n = {top:g} our hypergradient ran with a peak RSS of "
            f"{big['peak_rss'] / 2**30:.2f} GiB (the process, JAX included; "
            f"{(big['peak_rss'] - big['baseline_rss']) / 2**30:.2f} GiB above its start).",
        ]
    lines.append("")


def _ran(row) -> bool:
    return bool(row) and row.get("error") is None


def many_small_ratios(table, key="run_s"):
    """Per problem, our batch time over the fastest JAX peer's among those whose batch
    converged from at least as many starts as ours (a peer that left more starts
    unsolved did not do the same job); per peer, the same ratio over the problems where
    it qualifies. Returns `(per_problem, per_peer, left_out)`, `left_out` naming the
    problems without a qualifying peer."""
    per_problem, per_peer, left_out = {}, {}, []
    for p, r in table.items():
        ours = r.get(OURS)
        if not _ran(ours):
            continue
        peers = {
            s: r[s][key]
            for s in JAX_PEERS
            if _ran(r.get(s)) and r[s]["converged"] >= ours["converged"]
        }
        if not peers:
            left_out.append(p)
            continue
        per_problem[p] = ours[key] / min(peers.values())
        for s, t in peers.items():
            per_peer.setdefault(s, []).append(ours[key] / t)
    return per_problem, per_peer, left_out


def many_small_section(data, path, lines, title=None):
    """`python -m benchmarks.many_small`: small problems from many starts in one program,
    under `vmap` or one after the other (`--form map`); `title` replaces the heading."""
    settings = data["settings"]
    tasks = settings["tasks"]
    form = settings.get("form", "vmap")
    table = _by_problem(data["rows"])
    solvers = [s for s in (OURS,) + JAX_PEERS if any(s in r for r in table.values())]
    per_problem, per_peer, left_out = many_small_ratios(table)
    cpu_ratios, _, _ = many_small_ratios(table, "run_cpu_s")
    starts = (
        f"Every problem above with at most {settings['max_n']} parameters, solved from "
        f"{tasks} starts around its own (`x0 (1 + 0.2 u) + 0.1 v`, `u, v` uniform on "
        "[-1, 1], seeded by the name)"
    )
    if form == "vmap":
        heading = "### Many small problems at once, under `vmap`"
        how = (
            " as one jitted `jax.vmap` of each library's solve, with the settings above "
            f"(at most {settings['max_steps']} iterations): the multi-start and per-task "
            "user, who pays Python's dispatch once per batch and, with a plain `vmap`, runs "
            "every start for as long as the slowest. `lbfgs_implicit` picks its batched "
            "form itself."
        )
    else:
        heading = "### Many small problems in one program, one after the other (`lax.map`)"
        how = (
            " one after the other, by one jitted `jax.lax.map` of each library's solve, "
            f"with the settings above (at most {settings['max_steps']} iterations): each "
            "solve runs as a single solve does inside a jitted outer loop (a bilevel step, "
            "a scan over tasks). A batch's time is then the solver's own cost summed over "
            "the starts, without what a call from Python adds, which on problems this "
            "small is a large part of a single call's time (the FAQ's \"Many tiny solves "
            'called one by one on CPU"), and over many starts instead of the forward '
            "set's one."
        )
    runs = data.get("runs", ())
    if runs:
        command = "Commands: " + ", then ".join(
            f"`{r['command']}`" + (f" ({r['note']})" if r.get("note") else "") for r in runs
        )
    else:
        command = f"Command: `{data['command']}`"
    lines += [
        title or heading,
        "",
        f"{command} (results: `{_rel(path)}`, {data.get('wall_s', 0) / 60:.1f} min). "
        f"{_machine_line(data)}.",
        "",
        starts + how + " Each cell: median milliseconds per batch (solvers in turns over "
        f"{settings['rounds']} rounds; a batch slower than {settings['slow_s']:g} s is "
        "timed once), the starts that converged ($\\|\\nabla f\\|_\\infty \\le$ "
        f"{settings['gtol']:g}, recomputed for all) and the evaluations summed over "
        "starts (jaxopt's include one value-only evaluation per iteration). A peer is "
        "compared only where it converged from at least as many starts as ours.",
        "",
    ]
    if per_problem:
        above = sorted(((p, r) for p, r in per_problem.items() if r > 1.2), key=lambda kv: -kv[1])
        lines += [
            "| measure | result |",
            "| --- | --- |",
            f"| ours / fastest qualifying JAX peer, geometric mean over {len(per_problem)} "
            f"problems | {_geomean(per_problem.values()):.2f}x wall, "
            f"{_geomean(cpu_ratios.values()):.2f}x CPU |",
            "| per peer (geometric mean where it qualifies) | "
            + ", ".join(f"{s} {_geomean(v):.2f}x ({len(v)})" for s, v in sorted(per_peer.items()))
            + " |",
            "| above 1.2x the fastest peer | "
            + (", ".join(f"{p} {r:.2f}" for p, r in above) or "none")
            + " |",
        ]
        if left_out:
            lines.append(
                "| no peer converged from as many starts as ours | " + ", ".join(left_out) + " |"
            )
        fewer = []
        for p, r in table.items():
            ours = r.get(OURS)
            if not _ran(ours):
                continue
            more = [
                f"{s} {r[s]['converged']}"
                for s in JAX_PEERS
                if _ran(r.get(s)) and r[s]["converged"] > ours["converged"]
            ]
            if more:
                fewer.append(f"{p} {ours['converged']} ({', '.join(more)})")
        lines.append(
            "| starts where a peer converged more often than ours | "
            + ("; ".join(fewer) or "none")
            + " |"
        )
        lines.append("")
    header = "| problem | n | " + " | ".join(solvers) + " | ours / fastest peer |"
    lines += [header, "| --- | ---: |" + " ---: |" * (len(solvers) + 1)]
    for p, r in table.items():
        cells = []
        for s in solvers:
            row = r.get(s)
            if not row:
                cells.append("")
            elif row.get("error") is not None:
                cells.append("failed")
            else:
                cells.append(f"{_ms(row['run_s'])} · {row['converged']}/{tasks} · {row['evals']:,}")
        ratio = f"{per_problem[p]:.2f}" if p in per_problem else "–"
        n = next(row["n"] for row in r.values())
        lines.append(f"| {p} | {n} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")


def bounds_section(mode, lines):
    """Bound-constrained solves (`python -m benchmarks.bounds`), if a result file exists."""
    from .bounds import hypergradient_lines, table_lines

    data, path = _load("bounds", mode)
    if not data:
        return
    lines += [
        "## Bound-constrained solves (L-BFGS-B)",
        "",
        f"From `{data['command']}` ({path.name}): lbfgs_implicit with `bounds`, SciPy's "
        "L-BFGS-B (jitted value and gradient) and `jaxopt.LBFGSB`, float64, "
        f"`gtol = {data['settings']['gtol']:g}` on the projected gradient (jaxopt: `tol` on "
        "its own test), memory 10, the solvers of a problem interleaved; converged = "
        "projected-gradient infinity norm at most `gtol`, recomputed for every solver, at a "
        "point inside the box. Times are ratios of medians measured in the same run.",
        "",
        *table_lines(data["rows"]),
        "",
    ]
    if data.get("hypergradient"):
        lines += [
            "Hypergradient of a validation loss with respect to the log ridge weight of a "
            "nonnegative least-squares problem (same run): ours (`bounds`, default tolerances) "
            "and `jaxopt.LBFGSB(implicit_diff=True, tol=1e-10)`, each against the closed form "
            "on the free set; time of the jitted value and gradient, interleaved.",
            "",
            *hypergradient_lines(data["hypergradient"]),
            "",
        ]


def compile_mlp_section(lines):
    """Compile time of an MLP hypergradient (`python -m benchmarks.compile_mlp`)."""
    from .compile_mlp import split_lines, table_lines

    path = RESULTS_DIR / "compile_mlp.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    lines += [
        "## Compile time: a hypergradient through an MLP inner problem",
        "",
        f"From `{data['command'].strip()}` (`benchmarks/results/{path.name}`): "
        "`jax.value_and_grad` of the iMAML query loss (1-40-40-1 MLP, six parameter "
        "leaves) through each solver, for one task and for `vmap` over 16, traced, lowered "
        f"and compiled afresh {data['rounds']} times with the solvers taking turns. Median "
        "CPU seconds of the process (wall seconds in brackets; the machine was shared), "
        "ratios of the CPU medians. `lbfgs_implicit` solves the six leaves as one "
        "vector (what `optimize` does for several leaves of one dtype on one device); "
        "`lbfgs_implicit_leafwise` is the same solve traced per leaf, as `optimize` did "
        "before, and as it still does for mixed dtypes or sharded leaves; `unrolled_gd` is "
        f"{data['gd_steps']} steps of gradient descent differentiated through. A failed "
        "peer did not compile (the script prints why)."
        + (
            " `lbfgs_implicit_unchecked` is ours with `ImplicitAdjoint(check_degenerate=False)`."
            if any(r["solver"] == "lbfgs_implicit_unchecked" for r in data["rows"])
            else ""
        ),
        "",
        *table_lines(data),
        "",
    ]
    path = RESULTS_DIR / "compile_mlp-split.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    lines += [
        "### Where the compile goes",
        "",
        f"From `{data['command'].strip()}` (`benchmarks/results/{path.name}`): the "
        "median CPU seconds of each stage, `jax.jit(f).trace` (Python: tracing, "
        "autodiff, batching), `.lower()` (to StableHLO) and `.compile()` (XLA), and the "
        "size of each program: StableHLO operations, and the compiled HLO's kernels "
        "(instructions outside fusion bodies, less parameters, tuples and constants). "
        "XLA:CPU's compile follows the kernels: its HLO passes take a few percent of it, "
        "and emitting and compiling each kernel's code with LLVM the rest (seen with "
        "`TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=2`).",
        "",
        *split_lines(data),
        "",
    ]


def batching_section(lines):
    """Batched solves under `vmap` (`python -m benchmarks.batching`), one table per file."""
    paths = sorted(RESULTS_DIR.glob("batching-*.json"))
    if not paths:
        return
    lines += [
        "## Batched solves under `vmap`",
        "",
        "From `python -m benchmarks.batching` (one row per mode; each file's command below). "
        "`refill/D` solves the batch by turns in T/D lanes, each loading the next pending "
        "task when its own has finished; `refill` is the library's lane count (and, in "
        "value-and-gradient files, the backward CG in as many refilled lanes, forced: "
        "the library does so only from 3 KiB per element; `refill-vmapcg` keeps it under "
        "plain `vmap`); `turns` is "
        "one lane per task; `vmap` is plain `vmap`. Evaluations are counted on the host "
        "(deterministic); times are CPU seconds of the compiled program, the modes "
        "interleaved, and the ratios against plain `vmap` are the median over rounds of "
        "each round's ratio, on the mixed batch and on T copies of its slowest task. "
        "`mixed / copies` is the mixed batch's cost over that of the copies in the same "
        "mode: CPU seconds and, in brackets where the file counted them, the evaluations "
        "the lanes paid (a turn is one evaluation per lane). #17's target is 1.25 (mean / "
        "max iterations), given under each table. The copies' solves need not take the "
        "slowest task's steps: a long solve's step count changes with the rounding of the "
        "batch it runs in (the copies' steps are given too).",
        "",
    ]
    for path in paths:
        data = json.loads(path.read_text())
        command = data["command"].replace("benchmarks/batching.py", "benchmarks.batching")
        head, _, args = command.partition("benchmarks.batching")
        prefix = head[: head.rfind("python")]  # e.g. `taskset -c 1 `
        args = args.strip()
        program = "forward solves" if "--forward" in args else "value and gradient"
        lines += [
            f"`{prefix}python -m benchmarks.batching {args}` "
            f"(`benchmarks/results/{path.name}`), "
            f"{program}:",
            "",
            "| problem | T | dtype | mode | lanes | evaluations (own) | CPU / vmap, mixed "
            "| CPU / vmap, copies | mixed / copies | compile CPU s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        targets = []
        for row in data["rows"]:
            num, ratios = row["tasks"], row.get("cpu_ratios", {})
            for mode, evals in row["lane_evals"].items():
                # Rows written before they recorded lanes come from the policy of
                # T/4 lanes (at most 64) for `refill`.
                lanes = row.get("lanes", {}).get(mode)
                if lanes is None:
                    divisor = mode.partition("/")[2].partition("@")[0]
                    if mode in ("turns", "vmap"):
                        lanes = num
                    elif divisor:
                        lanes = num // int(divisor)
                    else:
                        lanes = min(num // 4, 64)
                mixed = ratios.get(f"{mode}/vmap-mixed")
                copies = ratios.get(f"{mode}/vmap-slowest")
                compile_s = row.get("compile_cpu_s", {}).get(mode)
                own = ratios.get(f"{mode}-mixed/slowest")
                copies_evals = row.get("copies_lane_evals", {}).get(mode)
                own_cell = "–" if own is None else f"{own:.2f}"
                if copies_evals:
                    own_cell += f" ({evals / copies_evals:.2f})"
                cells = [
                    row["problem"],
                    str(num),
                    row["dtype"],
                    mode,
                    str(lanes),
                    f"{evals:,} ({row['own_evals']:,})",
                    "–" if mixed is None else f"{mixed:.2f}",
                    "–" if copies is None else f"{copies:.2f}",
                    own_cell,
                    "–" if compile_s is None else f"{compile_s:.1f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            if ratios:
                share = row["steps_mean"] / row["steps_max"]
                text = f"T = {num}: mean / max iterations {share:.2f}, target {1.25 * share:.2f}"
                if "copies_steps" in row:
                    steps = ", ".join(f"{m} {n}" for m, n in row["copies_steps"].items())
                    text += f"; the copies' steps: {steps}"
                targets.append(text)
        lines += ["", *[t + "." for t in targets], ""] if targets else [""]


def _table(rows, columns):
    """A Markdown table: one line per row, one cell per `(header, cell_of_row)` column."""
    lines = ["| " + " | ".join(head for head, _ in columns) + " |"]
    lines.append("|" + " --- |" * len(columns))
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return lines


def _extra_evals(row):
    """Evaluations per iteration that the longer solve added over the shorter one."""
    return (row["long_evals"] - row["evals"]) / max(row["long_iters"] - row["iters"], 1)


def _scale_tables(scale, lines, steady=True, floor=True):
    """The scale benchmark's tables: mean and (with `steady`) steady time per iteration;
    `floor` adds the ratio to the floor."""
    peers = [p for p in JAX_PEERS if any(p in c["solvers"] for c in scale["cases"])]

    def ours(fmt):
        return lambda c: fmt(c["solvers"][OURS], c)

    def peer(p, fmt):
        return lambda c: fmt(c["solvers"][p]) if p in c["solvers"] else "-"

    case = [
        ("n", lambda c: f"{c['n']:g}"),
        ("leaf", lambda c: c["shape"]),
        ("dtype", lambda c: c["dtype"]),
        ("m", lambda c: str(c["history_size"])),
    ]
    lines += _table(
        scale["cases"],
        case
        + [
            ("ours ms/iter", ours(lambda r, c: f"{r['per_iter_ms']:.1f}")),
        ]
        + (
            [("ours / floor", ours(lambda r, c: f"{c['ours_over_floor_median']:.2f}"))]
            if floor
            else []
        )
        + [
            column
            for p in peers
            for column in (
                (f"{p} ms/iter", peer(p, lambda r: f"{r['per_iter_ms']:.1f}")),
                (
                    f"ours / {p}",
                    peer(
                        p,
                        lambda r: (
                            f"{r['ours_over_this_median']:.2f} ({r['ours_over_this_min']:.2f})"
                        ),
                    ),
                ),
            )
        ]
        + [("temporaries: ours", ours(lambda r, c: f"{r['temp_per_n']:.0f} n"))]
        + [(p, peer(p, lambda r: f"{r['temp_per_n']:.0f} n")) for p in peers],
    )
    if steady and all("steady_ms" in c["solvers"][OURS] for c in scale["cases"]):
        lines += [
            "",
            f"Steady cost of an iteration: every solver also ran {2 * scale['iters']} "
            "iterations, and the difference of the two solves' times over the difference "
            "of their iteration counts (per round, median) leaves out what a solve pays "
            "once: the evaluation at `x0` and the first line search, which has no "
            "curvature to scale its step. Evaluations per iteration likewise: the longer solve's "
            "extra evaluations over its extra iterations.",
            "",
        ]
        lines += _table(
            scale["cases"],
            case
            + [
                ("ours ms/iter", ours(lambda r, c: f"{r['steady_ms']:.1f}")),
                ("ours evals/iter", ours(lambda r, c: f"{_extra_evals(r):.2f}")),
                ("ours / floor", ours(lambda r, c: f"{c['steady_ours_over_floor_median']:.2f}")),
            ]
            + [
                column
                for p in peers
                for column in (
                    (f"{p} ms/iter", peer(p, lambda r: f"{r['steady_ms']:.1f}")),
                    (f"{p} evals/iter", peer(p, lambda r: f"{_extra_evals(r):.2f}")),
                    (f"ours / {p}", peer(p, lambda r: f"{r['steady_ours_over_this_median']:.2f}")),
                )
            ],
        )


def scale_section(scale, path, by_shape, shape_path, lines):
    """Memory and time per iteration at large n against the peers."""
    lines += [
        "## Scale: memory and time per iteration",
        "",
        f"From `{scale['command']}` (`{_rel(path)}`): a smoothing objective on n "
        "parameters held as one vector or one square matrix, every solver running "
        f"{scale['iters']} iterations with its stopping tests off. Time per iteration is "
        "the median solve time over the iterations run; ratios are ours over the peer's, "
        f"per round, over {scale['rounds']} interleaved rounds (median, and minimum in "
        "brackets). The floor is one value-and-gradient plus two passes over the memory, "
        "timed in the same rounds. Memory is XLA's `temp_size_in_bytes` of the compiled "
        "solve in units of the parameters' bytes (the memory itself is "
        "`2 * history_size` of them).",
        "",
    ]
    _scale_tables(scale, lines)
    lines += [
        "",
        "A dash: the solver failed to compile that case (the script prints why; "
        "optimistix's two-loop recursion changes its carry's dtype in float32 with "
        "float64 enabled). Temporaries above `2 * history_size + 10` include the "
        "objective's own intermediates.",
        "",
    ]
    if by_shape:
        lines += [
            "### Temporaries by leaf shape",
            "",
            f"From `python benchmarks/memory_scaling.py --shapes-only` (`{_rel(shape_path)}`): "
            "the same objective on about 1e5 parameters held as one vector, one matrix, a "
            "4-D convolution kernel or a dict of MLP layers; temporaries of the compiled "
            "forward solve and of `value_and_grad` of an outer loss through it, in units of "
            "the parameters' bytes.",
            "",
            "| leaves | dtype | history_size | forward | value_and_grad |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in by_shape:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['history_size']} | "
                f"{r['forward']:.1f} n | {r['value_and_grad']:.1f} n |"
            )
        lines.append("")


def _reference(row):
    if row["reference"] != "central differences":
        return row["reference"]
    return f"central differences ({row.get('reference_gtol', 1e-9):.0e})"


def gpu_section(scale_path, hyper_path, small_path, lines):
    """The scale benchmark, the hypergradient sweep of `benchmarks.gpu_scaling` and the
    many-small-problems benchmark under `vmap`, as run on a GPU (the results files name
    the device)."""
    scale = json.loads(scale_path.read_text())
    device = scale["machine"].get("device_kind", scale["machine"].get("device"))
    versions = scale["machine"]["versions"]
    installed = [p for p in JAX_PEERS if versions.get(p, "not installed") != "not installed"]
    peers = ", ".join(f"{p} {versions[p]}" for p in installed)
    lines += [
        f"### On a GPU ({device})",
        "",
        f"From `{scale['command']}` (`{_rel(scale_path.resolve())}`), run on one {device} "
        f"with jax {versions['jax']}"
        + (f", the package at {scale['tree']}" if "tree" in scale else "")
        + f" and that machine's {peers}; the protocol and columns "
        "are those above, less the floor: timed one call at a time, it is mostly dispatch "
        "on a GPU at these sizes, and read below one iteration's cost. Every matrix "
        "product of the solver runs at its inputs' full precision "
        "(`lax.Precision.HIGHEST`): with JAX's default, float32 products on NVIDIA GPUs "
        "may use TF32, about three significant digits (`python -m benchmarks.ab_trees "
        "--base TREE` compares two trees of the package on any device).",
        "",
    ]
    _scale_tables(scale, lines, steady=False, floor=False)
    lines += [
        "",
        f"The steady cost is left out here: by iteration {scale['iters']} every solver has "
        "reached the minimum to rounding, and the longer solves' extra iterations run past "
        "it, where optimistix's rejected steps skip the memory's update and our line "
        "search spends more evaluations (the results file has them). Time per iteration "
        f"above is over the {scale['iters']} iterations to that point, the last few of "
        "them past the minimum in float32 too.",
    ]
    if hyper_path.exists():
        hyper = json.loads(hyper_path.read_text())
        lines += [
            "",
            f"Hypergradients, from `{hyper['command']}` (`{_rel(hyper_path.resolve())}`, "
            f"{hyper['device']}, jax {hyper['jax']}"
            + (f", the package at {hyper['tree']}" if "tree" in hyper else "")
            + "): the separable, non-quadratic inner "
            "problem of `benchmarks/gpu_scaling.py` with n parameters and n "
            "hyperparameters, solved to `gtol` 1e-9 (float64) or 1e-4 (float32); warm "
            "medians of 5 runs, compile times apart. The error is the relative error of the "
            "hypergradient along a random direction, against central differences (float64, "
            "of solves to the `gtol` in brackets, tighter than the timed solves: a "
            "difference of two solves carries about their `gtol` of error itself) or "
            "against the float64 hypergradient of the same data (float32).",
            "",
            "| n | dtype | forward ms | value_and_grad ms | compile s (forward, value_and_grad) "
            "| error | against |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in hyper["rows"]:
            lines.append(
                f"| {r['n']:.0e} | {r['dtype']} | {r['forward_ms']:.1f} | "
                f"{r['value_and_grad_ms']:.1f} | {r['compile_forward_s']:.1f}, "
                f"{r['compile_value_and_grad_s']:.1f} | "
                f"{r['directional_derivative_rel_err']:.0e} | {_reference(r)} |"
            )
    lines.append("")
    if small_path.exists():
        data = json.loads(small_path.read_text())
        title = f"#### Many small problems at once, under `vmap`, on the {device}"
        many_small_section(data, small_path.resolve(), lines, title=title)
        buffers = small_path.with_name("many_small-gpu-h200-command-buffers.json")
        if buffers.exists():
            runs = json.loads(buffers.read_text())["runs"]
            default = {(r["problem"], r["solver"]): r["run_s"] for r in runs["default"]["rows"]}
            gains = {}
            for r in runs["command_buffers"]["rows"]:
                key = (r["problem"], r["solver"])
                gains.setdefault(r["solver"], []).append(default[key] / r["run_s"])
            spans = ", ".join(f"{s} {min(g):.2f}x-{max(g):.2f}x" for s, g in gains.items())
            lines += [
                "Every library here waits on the host for each turn of a `while` loop and "
                'launches its kernels one by one; the FAQ\'s "Many small problems on a GPU" '
                "measures XLA's flags that keep loops on the device "
                f"(`{_rel(buffers)}`): batches {spans} faster.",
                "",
            ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("full", "quick"), default=None)
    parser.add_argument("--forward", default=None, help="a forward results file")
    parser.add_argument("--hypergrad", default=None, help="a hypergradient results file")
    parser.add_argument("--compile-time", default=None, help="a compile-time results file")
    parser.add_argument("--scale", default=None, help="a scale results file")
    parser.add_argument("--many-small", default=None, help="a many_small results file")
    parser.add_argument(
        "--many-small-map", default=None, help="a many_small results file of `--form map`"
    )
    parser.add_argument("--page", default=str(PAGE))
    opts = parser.parse_args(argv)
    page = Path(opts.page)
    img = page.parent / "img"
    fwd, fwd_path = _load("forward", opts.mode)
    hyp, hyp_path = _load("hypergrad", opts.mode)
    if opts.forward:
        fwd_path = Path(opts.forward).resolve()
        fwd = json.loads(fwd_path.read_text())
    if opts.hypergrad:
        hyp_path = Path(opts.hypergrad).resolve()
        hyp = json.loads(hyp_path.read_text())
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.report` from the result files named below "
        "(`make bench` runs everything and regenerates this page; `make bench-quick` is the "
        "small version). Timings come from a shared 2-core machine and move by tens of "
        "percent between runs; ratios measured in the same run are the numbers to read.",
        "",
    ]
    img.mkdir(parents=True, exist_ok=True)
    compile_time = None
    ct_path = Path(opts.compile_time) if opts.compile_time else RESULTS_DIR / "compile_time.json"
    if ct_path.exists():
        compile_time = (json.loads(ct_path.read_text()), ct_path.resolve())
    if fwd:
        forward_section(fwd, fwd_path, lines, compile_time)
        table, solvers, _ = forward_summary(fwd)
        profile_plot(table, solvers, img / "bench_profile.png")
    for kind, given in (("many_small", opts.many_small), ("many_small-map", opts.many_small_map)):
        small, small_path = _load(kind, opts.mode)
        if given:
            small_path = Path(given).resolve()
            small = json.loads(small_path.read_text())
        if small:
            many_small_section(small, small_path, lines)
    if hyp:
        hyper_section(hyp, hyp_path, lines)
        if "sweep" in hyp:
            sweep_plots(
                hyp["sweep"]["rows"], img / "bench_sweep_time.png", img / "bench_sweep_memory.png"
            )
    bounds_section(opts.mode, lines)
    compile_mlp_section(lines)
    batching_section(lines)
    scale_path = Path(opts.scale) if opts.scale else RESULTS_DIR / "scale.json"
    shape_path = RESULTS_DIR / "memory_by_shape.json"
    if scale_path.exists():
        by_shape = None
        if shape_path.exists():
            by_shape = json.loads(shape_path.read_text())["temporaries_by_shape"]
        scale_section(
            json.loads(scale_path.read_text()),
            scale_path.resolve(),
            by_shape,
            shape_path.resolve(),
            lines,
        )
    gpu_scale = RESULTS_DIR / "scale-gpu-h200.json"
    if gpu_scale.exists():
        gpu_section(
            gpu_scale,
            RESULTS_DIR / "gpu-scaling-h200.json",
            RESULTS_DIR / "many_small-gpu-h200.json",
            lines,
        )
    if not fwd and not hyp:
        lines.append("No results yet: run `make bench-quick`.")
    page.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
