"""Calibration eval, AA-Omniscience style: answer without tools, an LLM judge grades against the gold answer.

Omniscience Index = 100 * (correct - incorrect) / total: a wrong answer costs a point, abstaining costs nothing.
accuracy = correct / total; hallucination rate = incorrect / (total - correct), how often the model guesses
wrong when it does not answer right. PARTIAL_ANSWER has no place in those formulas, so `partial` chooses:
"incorrect" counts it as a wrong answer (the strict reading), "abstain" counts it as not attempted.
Ungraded items (the judge named no grade, or judges tied) are left out of the totals and listed.

Run directory: config.json, answers.jsonl, grades.jsonl, reviews.jsonl (human overrules, see review.py),
results.json, report.md, plots/domains.png. `resume=True` re-asks nothing already in answers/grades.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from k2lab.agents.llm import EndpointError
from k2lab.evals import report
from k2lab.evals.judge import GRADES, Judge, JudgeError, vote
from k2lab.evals.stats import bootstrap_ci
from k2lab.evals.store import ON_ERROR, Dataset, open_run, read_dataset, require, snapshot
from k2lab.runs import append_jsonl, read_jsonl, write_json

PARTIAL_CONVENTIONS = ("incorrect", "abstain")
SEED_DATASET = Path(__file__).parent / "data" / "calibration.jsonl"

ANSWER_PROMPT = """\
You are answering a question about {domain}, specifically {topic}. Reply with just the answer, no explanation.
A wrong answer is worse than no answer: if you do not know, or would need tools or more context to be sure,
say that you do not know instead of guessing."""

CORRECT, INCORRECT, ABSTAIN = 0, 1, 2  # outcome codes after the PARTIAL convention


def check_row(row: dict) -> None:
    require(row, {"domain": str, "topic": str, "question": str, "answer": str})


def item_id(row: dict) -> str:
    return str(row.get("id") or hashlib.sha1(row["question"].encode()).hexdigest()[:12])


def load_dataset(path: str | Path, on_error: str = "stop") -> Dataset:
    data = read_dataset(path, check_row, on_error)
    seen: dict[str, int] = {}
    for i, row in enumerate(data.rows):
        row["id"] = item_id(row)
        if row["id"] in seen:
            raise ValueError(f"{path}: duplicate item id {row['id']!r} (rows {seen[row['id']] + 1} and {i + 1})")
        seen[row["id"]] = i
    return data


@dataclass
class CalibrationSettings:
    """`k2lab eval calibration`. Endpoints, keys and the model default to K2LAB_* / OPENAI_* (agents/llm.py)."""

    judge_models: list[str] = field(default_factory=list)
    dataset: str | None = None  # JSONL or CSV; None: the shipped seed set
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    judge_base_url: str | None = None  # None: base_url
    judge_api_key: str | None = None  # None: api_key when the judges share the model's endpoint
    run_dir: str = "runs/eval-calibration"
    partial: str = "incorrect"  # PARTIAL_ANSWER counts as "incorrect" or "abstain"
    resume: bool = False
    on_error: str = "stop"  # a bad dataset row: "stop" or "skip"
    concurrency: int = 8
    max_tokens: int = 512  # cap on each answer and each judge reply
    grader: str = "judge"  # "judge": the LLM judges; "rules": the deterministic grader (rules.py), offline

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.partial not in PARTIAL_CONVENTIONS:
            raise ValueError(f"partial must be one of {PARTIAL_CONVENTIONS}, got {self.partial!r}")
        if self.grader not in ("judge", "rules"):
            raise ValueError(f"--grader must be 'judge' or 'rules', got {self.grader!r}")
        if self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError(f"concurrency and max_tokens must be >= 1, got {self.concurrency}, {self.max_tokens}")


async def run_calibration(model, judges: list[Judge], s: CalibrationSettings) -> dict:
    """Answer every question with `model` (an LLM), grade with `judges`, write results.json and report.md."""
    if not judges:
        raise ValueError("calibration needs at least one judge (--judge-model)")
    dataset = s.dataset or SEED_DATASET
    run_dir = Path(s.run_dir)
    open_run(run_dir, "calibration", s.resume, model.model)
    data = load_dataset(dataset, s.on_error)
    snapshot(run_dir, data.rows)
    write_json(run_dir / "config.json", {"eval": "calibration", "dataset": str(dataset), "model": model.model,
                                         "judges": [j.name for j in judges], "partial": s.partial,
                                         "max_tokens": s.max_tokens, "skipped_rows": data.skipped})
    answers = {a["id"]: a for a in read_jsonl(run_dir / "answers.jsonl")}
    graded = {(g["id"], g["judge"]) for g in read_jsonl(run_dir / "grades.jsonl")}
    bar = tqdm(total=len(data.rows), desc="calibration", unit="q")
    stopping: list[bool] = []

    async def one(row: dict) -> None:
        try:
            if row["id"] not in answers:
                system = ANSWER_PROMPT.format(domain=row["domain"], topic=row["topic"])
                res = await model.chat([{"role": "system", "content": system},
                                        {"role": "user", "content": row["question"]}], temperature=0.0,
                                       max_tokens=s.max_tokens)
                answers[row["id"]] = rec = {"id": row["id"], "answer": res.message.get("content") or "",
                                            "finish_reason": res.finish_reason, "usage": res.usage}
                append_jsonl(run_dir / "answers.jsonl", rec)
            for judge in judges:
                if (row["id"], judge.name) not in graded:
                    g = await judge.grade(row["question"], row["answer"], answers[row["id"]]["answer"])
                    append_jsonl(run_dir / "grades.jsonl", {"id": row["id"], **g})
        except (EndpointError, JudgeError):  # every item would fail the same way: stop (--resume continues)
            stopping.append(True)
            raise
        except Exception as e:  # the endpoint failed past its retries: log it, leave the item for --resume
            if not stopping:  # (requests cut off by a stop are not errors of their own)
                append_jsonl(run_dir / "errors.jsonl", {"id": row["id"], "error": f"{type(e).__name__}: {e}"})
        finally:
            bar.update(1)

    try:
        if data.rows:  # one item alone first: a judge that cannot grade at all stops the run before the rest starts
            await one(data.rows[0])
        await asyncio.gather(*(one(r) for r in data.rows[1:]))
    finally:
        bar.close()
    return finalize(run_dir)


def load_items(run_dir: str | Path) -> list[dict]:
    """Dataset rows joined with the answer, every judge's grade, the vote, and the reviews (latest wins)."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "dataset.jsonl")
    answers = {a["id"]: a for a in read_jsonl(run_dir / "answers.jsonl")}
    grades: dict[str, list[dict]] = {}
    for g in read_jsonl(run_dir / "grades.jsonl"):
        grades.setdefault(g["id"], []).append(g)
    reviews: dict[str, list[dict]] = {}
    for r in read_jsonl(run_dir / "reviews.jsonl"):
        reviews.setdefault(r["id"], []).append(r)
    items = []
    for row in rows:
        if row["id"] not in answers:
            continue
        gs = grades.get(row["id"], [])
        judge_grade, tie = vote([g["grade"] for g in gs])
        rs = reviews.get(row["id"], [])
        final = rs[-1]["grade"] if rs else judge_grade
        items.append({**row, "gold": row["answer"], "answer": answers[row["id"]]["answer"], "grades": gs,
                      "judge_grade": judge_grade, "tie": tie, "reviews": rs, "grade": final})
    return items


def outcomes(grades: list[str], partial: str) -> np.ndarray:
    """Letters -> CORRECT / INCORRECT / ABSTAIN codes under the PARTIAL convention."""
    code = {"A": CORRECT, "B": INCORRECT, "D": ABSTAIN, "C": INCORRECT if partial == "incorrect" else ABSTAIN}
    return np.array([code[g] for g in grades], dtype=int)


def omniscience_index(o: np.ndarray) -> float:
    return 100.0 * (np.sum(o == CORRECT) - np.sum(o == INCORRECT)) / len(o) if len(o) else float("nan")


def accuracy(o: np.ndarray) -> float:
    return float(np.mean(o == CORRECT)) if len(o) else float("nan")


def hallucination_rate(o: np.ndarray) -> float:
    not_correct = np.sum(o != CORRECT)
    return float(np.sum(o == INCORRECT) / not_correct) if not_correct else float("nan")


def metrics(grades: list[str], partial: str, n_boot: int = 1000) -> dict:
    """Counts, the three metrics and their 95% bootstrap CIs for a list of letters (ungraded excluded)."""
    o = outcomes(grades, partial)
    out = {"total": len(grades), **{GRADES[k].lower(): grades.count(k) for k in GRADES}}
    for name, fn in (("omniscience_index", omniscience_index), ("accuracy", accuracy),
                     ("hallucination_rate", hallucination_rate)):
        value = fn(o)
        out[name] = None if np.isnan(value) else float(value)
        out[f"{name}_ci95"] = [None if np.isnan(v) else v for v in bootstrap_ci(o, fn, n_boot)]
    return out


def compute_results(items: list[dict], partial: str) -> dict:
    """Overall metrics, per domain, and per `kind` (fact / nonexistent) when the dataset has that field."""
    graded = [i for i in items if i["grade"]]

    def grouped(key: str) -> dict:
        groups: dict[str, list[str]] = {}
        for i in graded:
            if i.get(key):
                groups.setdefault(i[key], []).append(i["grade"])
        return {k: metrics(g, partial) for k, g in sorted(groups.items())}

    return {"partial": partial, "overall": metrics([i["grade"] for i in graded], partial),
            "domains": grouped("domain"), "kinds": grouped("kind"),
            "ungraded": [{"id": i["id"], "tie": i["tie"]} for i in items if not i["grade"]],
            "reviewed": sum(1 for i in items if i["reviews"]),
            "overruled": sum(1 for i in items if i["reviews"] and i["grade"] != i["judge_grade"])}


def finalize(run_dir: str | Path) -> dict:
    """Recompute metrics (with human overrules) and agreement; rewrite results.json and report.md."""
    from k2lab.evals.review import agreement  # review builds on calibration; import here to keep one direction

    run_dir = Path(run_dir)
    config = report.read_config(run_dir)
    items = load_items(run_dir)
    answered = {i["id"] for i in items}
    errors = {e["id"]: e["error"] for e in read_jsonl(run_dir / "errors.jsonl")}
    unanswered = [{"id": r["id"], "error": errors.get(r["id"], "not asked yet")}
                  for r in read_jsonl(run_dir / "dataset.jsonl") if r["id"] not in answered]
    results = {"eval": "calibration", "model": config["model"], "judges": config["judges"],
               **compute_results(items, config["partial"]), "agreement": agreement(items),
               "unanswered": unanswered, "skipped_rows": config.get("skipped_rows", [])}
    write_json(run_dir / "results.json", results)
    report.calibration_report(run_dir, results)
    return results


def main(s: CalibrationSettings) -> dict:
    """`k2lab eval calibration`."""
    from k2lab.agents.llm import LLM
    from k2lab.evals.rules import RulesJudge

    if s.grader == "judge" and not s.judge_models:
        raise ValueError("calibration needs at least one --judge-model (or --grader rules for closed-form answers)")
    if s.grader == "rules" and s.judge_models:
        raise ValueError("--grader rules grades without judges; drop --judge-model or use --grader judge")
    answerer = LLM(base_url=s.base_url, api_key=s.api_key, model=s.model, max_concurrency=s.concurrency)
    judge_key = s.judge_api_key or (s.api_key if s.judge_base_url is None else None)
    judges = [Judge(LLM(base_url=s.judge_base_url or s.base_url, api_key=judge_key, model=m,
                        max_concurrency=s.concurrency), max_tokens=s.max_tokens)
              for m in s.judge_models] if s.grader == "judge" else [RulesJudge()]

    async def go() -> dict:
        try:
            return await run_calibration(answerer, judges, s)
        finally:
            for llm in [answerer] + [j.llm for j in judges if isinstance(j, Judge)]:
                await llm.aclose()
    return asyncio.run(go())
