"""`trace.jsonl` (spans) and the trace tree; runs keep their journals with `k2lab.runs.append_jsonl`.

A span is one line written when it ends: id, parent, kind (run, agent, model, tool), name, agent, start
(seconds since the run began), dur_s, status and kind-specific fields (tokens, retries, cost_usd, outcome...).
The parent is taken from a context variable, so spans opened inside tasks that asyncio.gather starts nest under
the span that started them. Spans are buffered (a trace is for reading, not for resuming); a torn last line is
ignored when it is read back.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from k2lab.runs import read_jsonl, rewrite_jsonl

_current: contextvars.ContextVar[int | None] = contextvars.ContextVar("k2lab_span", default=None)


class Tracer:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        spans = read_jsonl(self.path)
        if self.path.exists() and not self.path.read_bytes().endswith(b"\n"):
            rewrite_jsonl(self.path, spans)  # a killed run left half a span: drop it before appending
        self._file = open(self.path, "a", buffering=1 << 16)
        self._ids = itertools.count(1 + max((s["id"] for s in spans), default=0))  # unique across resumes
        self._t0 = time.time()

    @contextmanager
    def span(self, kind: str, name: str, agent: str = "", **fields):
        """`with tracer.span(...) as rec: rec["tokens"] = ...`; fields set on rec are written at the end."""
        rec = {"id": next(self._ids), "parent": _current.get(), "kind": kind, "name": name, "agent": agent,
               "start": round(time.time() - self._t0, 6), **fields}
        token = _current.set(rec["id"])
        t = time.perf_counter()
        rec.setdefault("status", "ok")
        try:
            yield rec
        except BaseException as e:
            rec["status"] = f"error: {type(e).__name__}"
            raise
        finally:
            _current.reset(token)
            rec["dur_s"] = round(time.perf_counter() - t, 6)
            self._file.write(json.dumps(rec, default=str) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_spans(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "trace.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no trace.jsonl in {run_dir}")
    return read_jsonl(path)


def per_agent(spans: list[dict]) -> dict[str, dict]:
    """agent -> model calls, tool calls, tokens, retries, cost."""
    out: dict[str, dict] = defaultdict(lambda: {"model_calls": 0, "tool_calls": 0, "prompt_tokens": 0,
                                                "completion_tokens": 0, "retries": 0, "cost_usd": 0.0})
    for s in spans:
        if not s.get("agent"):
            continue
        row = out[s["agent"]]
        if s["kind"] == "model":
            row["model_calls"] += 1
            for k in ("prompt_tokens", "completion_tokens", "retries", "cost_usd"):
                row[k] += s.get(k, 0)
        elif s["kind"] == "tool":
            row["tool_calls"] += 1
    return dict(out)


def render_tree(run_dir: Path, max_children: int = 20) -> str:
    """Runs and agents as a tree (model and tool spans folded into counts), then a per-agent cost table."""
    spans = read_spans(run_dir)
    children: dict[int | None, list[dict]] = defaultdict(list)
    for s in spans:
        children[s["parent"]].append(s)
    stats = per_agent(spans)
    lines: list[str] = []

    def show(s: dict, depth: int) -> None:
        pad = "  " * depth
        extra = ""
        if s["kind"] == "agent":
            a = stats.get(s["agent"], {})
            extra = (f"  model={a.get('model_calls', 0)} tools={a.get('tool_calls', 0)} "
                     f"tokens={a.get('prompt_tokens', 0) + a.get('completion_tokens', 0)} "
                     f"retries={a.get('retries', 0)} outcome={s.get('outcome', '?')}")
        lines.append(f"{pad}{s['kind']} {s['name']}  {s['dur_s']:.3f}s{extra}"
                     + ("" if s["status"] == "ok" else f"  [{s['status']}]"))
        kids = sorted((c for c in children[s["id"]] if c["kind"] in ("run", "agent") or c["name"] == "assign_task"),
                      key=lambda c: c["start"])
        for c in kids[:max_children]:
            show(c, depth + 1)
        if len(kids) > max_children:
            lines.append(f"{pad}  ... {len(kids) - max_children} more")

    for root in sorted(children[None], key=lambda c: c["start"]):
        show(root, 0)
    lines.append("")
    lines.append(f"{'agent':<28}{'model':>7}{'tools':>7}{'prompt':>10}{'compl':>9}{'retries':>8}{'cost $':>10}")
    total = {k: sum(a[k] for a in stats.values()) for k in ("model_calls", "tool_calls", "prompt_tokens",
                                                             "completion_tokens", "retries", "cost_usd")}
    for name, a in sorted(stats.items()) + [("total", total)]:
        lines.append(f"{name[:27]:<28}{a['model_calls']:>7}{a['tool_calls']:>7}{a['prompt_tokens']:>10}"
                     f"{a['completion_tokens']:>9}{a['retries']:>8}{a['cost_usd']:>10.4f}")
    return "\n".join(lines)
