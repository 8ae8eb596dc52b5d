"""The dataset card of a synth run: card.json + card.md (+ tool_map.png), rewritten at the end of every run.

Counts and acceptance rates per stage and domain, rejection reasons, turn and tool-call distributions, usage
per stage (LLM runs), judge-human agreement (when people reviewed), and a 2-D map of the tools' descriptions.
The map embeds each tool's name + description as a hashed bag of words (1024 buckets, words and word pairs,
L2-normalised) and projects with PCA (SVD of the centred matrix): a coarse picture of coverage, not a
semantic embedding. Tools are coloured by source (embedded code, real MCP server, JSON file, LLM-synthetic).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from k2lab.runs import atomic_path, read_json, read_jsonl, write_atomic, write_json

BUCKETS = 1024


def embed(texts: list[str]) -> np.ndarray:
    """Hashed bag of words and word bigrams (crc32 buckets), L2-normalised rows."""
    x = np.zeros((len(texts), BUCKETS))
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", t.lower())
        for w in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            x[i, zlib.crc32(w.encode()) % BUCKETS] += 1.0
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca2(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return np.zeros((len(x), 2))
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    out = xc @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def tool_catalog(out: Path, records: list[dict]) -> list[dict]:
    """Every tool of the run once: tools.jsonl (written by the LLM path, with sources) + tools in trajectories."""
    tools = {t["name"]: t for t in read_jsonl(out / "tools.jsonl")}
    for r in records:
        for t in r["tools"]:
            fn = t["function"]
            tools.setdefault(fn["name"], {"name": fn["name"], "description": fn.get("description", ""),
                                          "source": r.get("tool_source", "embedded")})
    return sorted(tools.values(), key=lambda t: t["name"])


def _dist(values) -> dict:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def build(out: Path) -> dict:
    kept, rejected = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "rejected.jsonl")
    queued = read_jsonl(out / "queue.jsonl")  # judges unsure: waiting for a person (LLM runs)
    records = kept + rejected + queued
    run = read_json(out / "run.json")
    per_domain = {}
    for d in sorted({r["domain"] for r in records}):
        rs = [r for r in records if r["domain"] == d]
        rubric = [r for r in rs if any(v["judge"] != "format check" for v in r["verdicts"])
                  and all(v["passed"] for v in r["verdicts"] if v["judge"] != "format check")]
        fmt_ok = [r for r in rubric if all(v["passed"] for v in r["verdicts"] if v["judge"] == "format check")]
        n_kept = sum(r["accepted"] for r in rs)
        n_queued = sum(r.get("decision") == "unsure" for r in rs)
        per_domain[d] = {"trajectories": len(rs), "passed_rubric_or_judges": len(rubric),
                         "passed_format": len(fmt_ok), "kept": n_kept, "queued": n_queued,
                         "rejected": len(rs) - n_kept - n_queued,
                         "acceptance_rate": round(n_kept / len(rs), 4)}
    tools = tool_catalog(out, records)
    xy = pca2(embed([f"{t['name']} {t['description']}" for t in tools])) if tools else np.zeros((0, 2))
    card = {
        "identity": run.get("identity", {}),
        "totals": {"trajectories": len(records), "kept": len(kept), "rejected": len(rejected), "queued": len(queued),
                   "acceptance_rate": round(len(kept) / len(records), 4) if records else None},
        "stages": read_json(out / "stages.json") if (out / "stages.json").exists() else {},
        "per_domain": per_domain,
        "rejection_reasons": dict(Counter(x.split(":")[0] for r in rejected for x in r["reasons"]).most_common()),
        "turns_per_trajectory": _dist(r["stats"]["turns"] for r in kept),
        "assistant_messages_per_trajectory": _dist(r["stats"]["assistant_messages"] for r in kept),
        "tool_calls_per_trajectory": _dist(r["stats"]["tool_calls"] for r in kept),
        "tool_calls_by_name": dict(Counter(tc["function"]["name"] for r in kept for m in r["messages"]
                                           for tc in m.get("tool_calls") or []).most_common()),
        "tool_faults_in_kept": sum(r["stats"]["tool_faults"] for r in kept),
        "review": read_json(out / "review.json") if (out / "review.json").exists() else None,
        "tool_map": {"method": "hashed bag of words + bigrams (1024 buckets), PCA to 2-D",
                     "points": [{"name": t["name"], "source": t["source"], "x": round(float(p[0]), 4),
                                 "y": round(float(p[1]), 4)} for t, p in zip(tools, xy)]},
    }
    return card


def _plot(card: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    pts = card["tool_map"]["points"]
    for source in sorted({p["source"] for p in pts}):
        sel = [p for p in pts if p["source"] == source]
        ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], label=f"{source} ({len(sel)})", s=18, alpha=0.8)
    ax.set_title("Tool descriptions (hashed bag of words, PCA)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if pts:
        ax.legend(fontsize=8)
    else:  # e.g. knowledge questions only: say so rather than draw empty axes (and warn about an empty legend)
        ax.text(0.5, 0.5, "no tools in these tasks", ha="center", va="center", transform=ax.transAxes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def markdown(card: dict) -> str:
    t = card["totals"]
    lines = ["# Synthesized dataset card", "",
             f"Trajectories: {t['trajectories']}, kept {t['kept']}, rejected {t['rejected']}, "
             f"waiting for human review {t['queued']} "
             f"(acceptance {t['acceptance_rate']}). Settings: `{card['identity']}`.", "",
             "| domain | trajectories | passed rubric/judges | passed format | kept | for review | acceptance |",
             "|---|---|---|---|---|---|---|"]
    for d, s in card["per_domain"].items():
        lines.append(f"| {d} | {s['trajectories']} | {s['passed_rubric_or_judges']} | {s['passed_format']} | "
                     f"{s['kept']} | {s['queued']} | {s['acceptance_rate']} |")
    if card["stages"]:
        lines += ["", "## Stages", "", "| stage | in | out | usage |", "|---|---|---|---|"]
        lines += [f"| {k} | {v.get('in', '')} | {v.get('out', '')} | {v.get('usage', '')} |"
                  for k, v in card["stages"].items()]
    lines += ["", "## Distributions (kept)", "",
              f"- turns per trajectory: {card['turns_per_trajectory']}",
              f"- assistant messages per trajectory: {card['assistant_messages_per_trajectory']}",
              f"- tool calls per trajectory: {card['tool_calls_per_trajectory']}",
              f"- tool calls by name: {card['tool_calls_by_name']}",
              f"- injected or edge-case tool failures inside kept trajectories: {card['tool_faults_in_kept']}",
              f"- rejection reasons: {card['rejection_reasons'] or 'none'}", "",
              "## Judge-human agreement", "",
              (f"{card['review']}" if card["review"] else
               "No human reviews in this run (embedded runs are graded by programmatic rubrics)."), "",
              "## Tool map", "", f"![tools](tool_map.png) {card['tool_map']['method']}; "
              f"{len(card['tool_map']['points'])} tools by source."]
    return "\n".join(lines) + "\n"


def write(out: str | Path) -> dict:
    out = Path(out)
    card = build(out)
    write_json(out / "card.json", card)
    write_atomic(out / "card.md", markdown(card))
    _plot(card, out / "tool_map.png")
    return card
