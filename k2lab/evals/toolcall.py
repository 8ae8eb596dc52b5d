"""Tool-call eval, K2 Vendor Verifier style: replay chat-completion request bodies, check the tool calls.

Each dataset line is a request body (`messages`, `tools`, sampling fields) plus optional `id` and `expect`
("tool_calls" or "stop", what a correct model does; used as the reference when no reference run is given).
Per request we record finish_reason, content and tool calls. Metrics:
- schema_accuracy = tool-call responses whose every call names a declared tool and whose JSON arguments
  validate against that tool's schema (jsonschema) / all tool-call responses;
- against a reference (another run, or `expect`): precision, recall and F1 of finish_reason == "tool_calls".
Moonshot's pass bars: F1 >= 0.80 for instruct models, >= 0.73 for thinking models.
`resume=True` re-sends only the requests that failed (endpoint errors past retries) or were never sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from tqdm import tqdm

from k2lab.agents.llm import EndpointError
from k2lab.evals import report
from k2lab.evals.store import ON_ERROR, Dataset, open_run, read_dataset, snapshot
from k2lab.runs import append_jsonl, read_jsonl, write_json

SEED_DATASET = Path(__file__).parent / "data" / "toolcalls.jsonl"
NOT_SENT = ("id", "expect", "model", "stream", "stream_options")  # our keys, and what the client sets itself
PASS_BARS = {"instruct": 0.80, "thinking": 0.73}


def check_row(row: dict) -> None:
    if not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError("field 'messages' must be a non-empty list")
    for k, tool in enumerate(row.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{k}] has no function.name")
        try:
            Draft202012Validator.check_schema(fn.get("parameters") or {})
        except SchemaError as e:
            raise ValueError(f"tools[{k}] ({fn['name']}): invalid JSON schema: {e.message}") from None
    if row.get("expect") not in (None, "tool_calls", "stop"):
        raise ValueError(f"field 'expect' must be 'tool_calls' or 'stop', got {row['expect']!r}")


def load_dataset(path: str | Path, on_error: str = "stop") -> Dataset:
    data = read_dataset(path, check_row, on_error)
    for row in data.rows:
        row.setdefault("id", hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:12])
        row["id"] = str(row["id"])
    ids = [r["id"] for r in data.rows]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"{path}: duplicate request ids {dup}")
    return data


def latest(records: list[dict]) -> dict[str, dict]:
    """The last record per request id (a rerun appends; nothing is rewritten)."""
    return {r["id"]: r for r in records}


@dataclass
class ToolcallSettings:
    """`k2lab eval toolcalls`. Endpoint, key and model default to K2LAB_* / OPENAI_* (agents/llm.py)."""

    dataset: str | None = None  # JSONL of request bodies; None: the shipped set
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    run_dir: str = "runs/eval-toolcalls"
    reference: str | None = None  # run dir of a reference run; None: the rows' `expect`
    resume: bool = False
    on_error: str = "stop"
    concurrency: int = 8
    max_retries: int = 6
    max_tokens: int = 512  # cap for requests whose body sets none, so an endless generation cannot stall a run

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.concurrency < 1 or self.max_tokens < 1 or self.max_retries < 0:
            raise ValueError(f"need concurrency >= 1, max_tokens >= 1, max_retries >= 0; got {self.concurrency}, "
                             f"{self.max_tokens}, {self.max_retries}")


async def run_toolcalls(model, s: ToolcallSettings) -> dict:
    """Send every request with `model` (an LLM); write responses.jsonl, results.json and report.md."""
    dataset = s.dataset or SEED_DATASET
    run_dir = Path(s.run_dir)
    log = run_dir / "responses.jsonl"
    open_run(run_dir, "toolcalls", s.resume, model.model)
    data = load_dataset(dataset, s.on_error)
    snapshot(run_dir, data.rows)
    write_json(run_dir / "config.json", {"eval": "toolcalls", "dataset": str(dataset), "model": model.model,
                                         "reference": str(s.reference) if s.reference else None,
                                         "max_tokens": s.max_tokens, "skipped_rows": data.skipped})
    done = {i for i, r in latest(read_jsonl(log)).items() if not r.get("error")}
    todo = [r for r in data.rows if r["id"] not in done]
    bar = tqdm(total=len(todo), desc="toolcalls", unit="req")

    async def one(row: dict) -> None:
        sampling = {"max_tokens": s.max_tokens} | {k: v for k, v in row.items()
                                                   if k not in NOT_SENT + ("messages", "tools")}
        try:
            res = await model.chat(row["messages"], tools=row.get("tools"), **sampling)
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in res.tool_calls]
            rec = {"id": row["id"], "finish_reason": res.finish_reason, "content": res.message.get("content"),
                   "tool_calls": calls, "retries": res.retries, "usage": res.usage}
        except EndpointError:  # nothing answers: every request would fail the same way
            raise
        except Exception as e:  # failed past the client's retries: recorded, re-sent by --resume
            rec = {"id": row["id"], "error": f"{type(e).__name__}: {e}"}
        append_jsonl(log, rec)
        bar.update(1)

    try:
        await asyncio.gather(*(one(r) for r in todo))
    finally:
        bar.close()
    return finalize(run_dir)


def validate_calls(calls: list[dict], tools: list[dict]) -> list[str | None]:
    """Per call: None if the name is declared and the JSON arguments validate, else the reason."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or []}
    out: list[str | None] = []
    for c in calls:
        if c["name"] not in schemas:
            out.append(f"undeclared tool {c['name']!r}")
            continue
        try:
            args = json.loads(c["arguments"]) if isinstance(c["arguments"], str) else c["arguments"]
        except json.JSONDecodeError as e:
            out.append(f"arguments are not JSON: {e.msg}")
            continue
        err = next(iter(Draft202012Validator(schemas[c["name"]]).iter_errors(args)), None)
        out.append(f"{'/'.join(map(str, err.absolute_path)) or '(root)'}: {err.message}" if err else None)
    return out


def prf(pred: list[bool], actual: list[bool]) -> dict:
    tp = sum(p and a for p, a in zip(pred, actual))
    fp = sum(p and not a for p, a in zip(pred, actual))
    fn = sum(a and not p for p, a in zip(pred, actual))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if tp + fp + fn else None)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": len(pred) - tp - fp - fn, "precision": precision,
            "recall": recall, "f1": f1}


def compute_results(rows: list[dict], responses: dict[str, dict], reference: dict[str, str] | None) -> dict:
    """Metrics from dataset rows, the latest response per id and the reference finish_reasons (id -> reason)."""
    answered = [(r, responses[r["id"]]) for r in rows if r["id"] in responses and not responses[r["id"]].get("error")]
    per_tool: dict[str, list[int]] = {}  # name -> [valid calls, calls]
    invalid, tool_responses, valid_responses = [], 0, 0
    for row, resp in answered:
        if resp["finish_reason"] != "tool_calls":
            continue
        tool_responses += 1
        reasons = validate_calls(resp["tool_calls"], row.get("tools"))
        valid_responses += bool(resp["tool_calls"]) and all(x is None for x in reasons)
        if not resp["tool_calls"]:
            invalid.append({"id": row["id"], "tool": None, "reason": "finish_reason tool_calls but no tool call"})
        for call, why in zip(resp["tool_calls"], reasons):
            counts = per_tool.setdefault(call["name"], [0, 0])
            counts[0] += why is None
            counts[1] += 1
            if why:
                invalid.append({"id": row["id"], "tool": call["name"], "reason": why})
    out = {"requests": len(rows), "answered": len(answered), "tool_call_responses": tool_responses,
           "schema_valid_responses": valid_responses,
           "schema_accuracy": valid_responses / tool_responses if tool_responses else None,
           "per_tool": {k: {"valid": v, "calls": n, "accuracy": v / n} for k, (v, n) in sorted(per_tool.items())},
           "invalid_calls": invalid,
           "errors": [{"id": r["id"], "error": responses[r["id"]]["error"]} for r in rows
                      if r["id"] in responses and responses[r["id"]].get("error")]}
    if reference is not None:
        both = [(resp["finish_reason"] == "tool_calls", reference[row["id"]] == "tool_calls")
                for row, resp in answered if row["id"] in reference]
        out["reference_compared"] = len(both)
        out["finish_reason"] = prf([p for p, _ in both], [a for _, a in both])
    return out


def finalize(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    config = report.read_config(run_dir)
    rows = read_jsonl(run_dir / "dataset.jsonl")
    responses = latest(read_jsonl(run_dir / "responses.jsonl"))
    if config["reference"]:
        ref = latest(read_jsonl(Path(config["reference"]) / "responses.jsonl"))
        reference = {i: r["finish_reason"] for i, r in ref.items() if not r.get("error")}
    else:
        reference = {r["id"]: r["expect"] for r in rows if r.get("expect")} or None
    results = {"eval": "toolcalls", "model": config["model"],
               "reference": config["reference"] or ("dataset expect" if reference else None),
               **compute_results(rows, responses, reference), "pass_bars_f1": PASS_BARS,
               "skipped_rows": config["skipped_rows"]}
    write_json(run_dir / "results.json", results)
    report.toolcall_report(run_dir, results)
    return results


def main(s: ToolcallSettings) -> dict:
    """`k2lab eval toolcalls`."""
    from k2lab.agents.llm import LLM

    llm = LLM(base_url=s.base_url, api_key=s.api_key, model=s.model, max_concurrency=s.concurrency,
              max_retries=s.max_retries)

    async def go() -> dict:
        try:
            return await run_toolcalls(llm, s)
        finally:
            await llm.aclose()
    return asyncio.run(go())
