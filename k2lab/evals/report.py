"""Reports: report.md with tables and a plot under the run directory, beside results.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from k2lab.runs import write_atomic  # noqa: E402


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.json; is this an eval run directory?")
    return json.loads(path.read_text())


def fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{fmt(x[0])}, {fmt(x[1])}]"
    return str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], title: str, ylabel: str,
             errors: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Grouped bars, one group per label; optional (lo, hi) error bars per series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) * max(1, len(series)) / 2 + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        vals = [float("nan") if v is None else v for v in values]
        yerr = None
        if errors and name in errors:
            yerr = [[max(0.0, v - (lo if lo is not None else v)) for v, (lo, _) in zip(vals, errors[name])],
                    [max(0.0, (hi if hi is not None else v) - v) for v, (_, hi) in zip(vals, errors[name])]]
        ax.bar(xs, vals, width, label=name, yerr=yerr, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.6)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def calibration_report(run_dir: Path, r: dict) -> None:
    cols = ["total", "correct", "incorrect", "partial_answer", "not_attempted", "omniscience_index",
            "omniscience_index_ci95", "accuracy", "accuracy_ci95", "hallucination_rate", "hallucination_rate_ci95"]
    rows = [["**all**"] + [r["overall"][c] for c in cols]]
    rows += [[d] + [m[c] for c in cols] for d, m in r["domains"].items()]
    rows += [[f"kind: {k}"] + [m[c] for c in cols] for k, m in r["kinds"].items()]
    domains = list(r["domains"])
    bar_plot(run_dir / "plots" / "domains.png", domains,
             {"accuracy": [r["domains"][d]["accuracy"] for d in domains],
              "hallucination rate": [r["domains"][d]["hallucination_rate"] for d in domains]},
             f"{r['model']}: per-domain calibration", "fraction",
             {"accuracy": [tuple(r["domains"][d]["accuracy_ci95"]) for d in domains],
              "hallucination rate": [tuple(r["domains"][d]["hallucination_rate_ci95"]) for d in domains]})
    bar_plot(run_dir / "plots" / "omniscience.png", domains,
             {"Omniscience Index": [r["domains"][d]["omniscience_index"] for d in domains]},
             f"{r['model']}: Omniscience Index per domain", "index (-100..100)",
             {"Omniscience Index": [tuple(r["domains"][d]["omniscience_index_ci95"]) for d in domains]})
    ag = r["agreement"]
    parts = [f"# Calibration: {r['model']}", "",
             f"Judges: {', '.join(r['judges'])}. PARTIAL counted as `{r['partial']}`. "
             f"Reviewed by a person: {r['reviewed']}, overruled: {r['overruled']}. 95% bootstrap CIs.", "",
             md_table(["domain"] + cols, rows), "",
             "![per-domain](plots/domains.png) ![omniscience](plots/omniscience.png)", "",
             "## Judge vs human", "", f"Cohen's kappa: {fmt(ag.get('cohen_kappa'))} over "
             f"{ag['reviewed_with_judge_grade']} reviewed items."]
    if "krippendorff_alpha" in ag:
        parts.append(f"Krippendorff's alpha ({', '.join(ag['alpha_raters'])}): {fmt(ag['krippendorff_alpha'])}.")
    if "confusion_judge_rows_human_cols" in ag:
        parts += ["", md_table(["judge \\ human"] + ag["labels"],
                               [[lab] + row for lab, row in zip(ag["labels"], ag["confusion_judge_rows_human_cols"])])]
    if ag["disagreements"]:
        parts += ["", "Disagreements:", "", md_table(["id", "judge", "human", "reason"],
                  [[d["id"], d["judge"], d["human"], d["reason"]] for d in ag["disagreements"]])]
    if r["ungraded"] or r["unanswered"] or r["skipped_rows"]:
        parts += ["", "## Left out", ""]
        parts += [f"- ungraded {u['id']}" + (" (judges tied)" if u["tie"] else "") for u in r["ungraded"]]
        parts += [f"- unanswered {u['id']}: {u['error']}" for u in r["unanswered"]]
        parts += [f"- skipped row {s}" for s in r["skipped_rows"]]
    write_atomic(run_dir / "report.md", "\n".join(parts) + "\n")


def toolcall_report(run_dir: Path, r: dict) -> None:
    fr = r.get("finish_reason") or {}
    labels = ["schema accuracy", "precision", "recall", "F1"] + [f"{t} args" for t in r["per_tool"]]
    values = [r["schema_accuracy"], fr.get("precision"), fr.get("recall"), fr.get("f1")]
    values += [v["accuracy"] for v in r["per_tool"].values()]
    bar_plot(run_dir / "plots" / "reliability.png", labels, {"fraction": values},
             f"{r['model']}: tool-call reliability", "fraction")
    parts = [f"# Tool calls: {r['model']}", "",
             f"Requests {r['requests']}, answered {r['answered']}, endpoint errors {len(r['errors'])}, "
             f"tool-call responses {r['tool_call_responses']}.", "",
             md_table(["metric", "value"],
                      [["schema_accuracy", r["schema_accuracy"]],
                       *[[f"finish_reason {k}", fr.get(k)]
                         for k in ("precision", "recall", "f1", "tp", "fp", "fn", "tn")]]),
             "", f"Reference: {r['reference'] or 'none (no precision/recall)'}. Pass bars on F1: "
             f"instruct >= {r['pass_bars_f1']['instruct']}, thinking >= {r['pass_bars_f1']['thinking']}.", "",
             "![reliability](plots/reliability.png)", "", "## Per tool", "",
             md_table(["tool", "calls", "valid", "accuracy"],
                      [[t, v["calls"], v["valid"], v["accuracy"]] for t, v in r["per_tool"].items()])]
    if r["invalid_calls"]:
        parts += ["", "## Invalid calls", "", md_table(["id", "tool", "reason"],
                  [[c["id"], c["tool"], c["reason"]] for c in r["invalid_calls"]])]
    if r["errors"] or r["skipped_rows"]:
        parts += ["", "## Left out", ""] + [f"- {e['id']}: {e['error']}" for e in r["errors"]]
        parts += [f"- skipped row {s}" for s in r["skipped_rows"]]
    write_atomic(run_dir / "report.md", "\n".join(parts) + "\n")


def coding_report(run_dir: Path, r: dict) -> None:
    ks = list(r["pass_at_k"])
    bar_plot(run_dir / "plots" / "pass_at_k.png", [f"pass@{k}" for k in ks], {"pass@k": list(r["pass_at_k"].values())},
             f"{r['model']}: coding", "fraction")
    parts = [f"# Coding: {r['model']}", "", f"{r['problems']} problems, {r['samples_per_problem']} samples each, "
             f"temperature {r['temperature']}. Unbiased pass@k.", "",
             md_table(["k", "pass@k"], [[k, v] for k, v in r["pass_at_k"].items()]), "",
             "![pass@k](plots/pass_at_k.png)", "", "## Per problem", "",
             md_table(["problem", "samples", "passed", "outcomes"],
                      [[p["id"], p["n"], p["c"], ", ".join(f"{k} {v}" for k, v in p["outcomes"].items())]
                       for p in r["per_problem"]])]
    if r["skipped_rows"]:
        parts += ["", "## Left out", ""] + [f"- skipped row {s}" for s in r["skipped_rows"]]
    write_atomic(run_dir / "report.md", "\n".join(parts) + "\n")
