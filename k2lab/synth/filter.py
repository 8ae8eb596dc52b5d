"""The embedded filter (programmatic rubric + format checks) re-applied to a stored trajectory, and measured against
a hand-labelled set (labelled.jsonl: good and bad trajectories, each with the reason for its label).

`regrade` replays the trajectory's assistant messages in a fresh environment of its task: tool calls run again
against the real tools (calls whose recorded result was an injected transient failure are left out, since they
changed nothing), so state checkpoints see the world the calls produced, and answer checkpoints read the
recorded answers. `measure` reports precision and recall of acceptance (positive = accepted / labelled good).
"""

from __future__ import annotations

from pathlib import Path

from k2lab.runs import read_jsonl
from k2lab.synth.domains import registry
from k2lab.synth.env import TRANSIENT, Environment, Task
from k2lab.synth.pipeline import decide

LABELLED = Path(__file__).with_name("labelled.jsonl")


def regrade(task: Task, messages: list[dict], tools: list[dict]) -> dict:
    """The decided record ({verdicts, accepted, reasons}) of `messages` replayed against `task`."""
    env = Environment(registry()[task.domain], task)
    env.reset()
    failed = {m["tool_call_id"] for m in messages if m["role"] == "tool" and m["content"].startswith(TRANSIENT)}
    try:
        for m in messages:
            if m["role"] != "assistant" or env.done:
                continue
            calls = [tc for tc in m.get("tool_calls") or [] if tc["id"] not in failed]
            if m.get("tool_calls") and not calls:
                continue  # only failed calls: nothing happened in the world
            env.step(m | {"tool_calls": calls} if calls else m)
        verdicts = [v | {"judge": "programmatic rubric"} for v in env.verdicts()]
    finally:
        env.close()
    return decide({"messages": messages, "tools": tools, "verdicts": verdicts})


def measure(path: str | Path = LABELLED) -> dict:
    """Precision / recall of the filter's acceptance against the labels, with the items it got wrong."""
    items = read_jsonl(path)
    tp = fp = fn = tn = 0
    wrong = []
    for it in items:
        accepted = regrade(Task(**it["task"]), it["messages"], it["tools"])["accepted"]
        good = it["label"] == "good"
        tp, fp, fn, tn = tp + (accepted and good), fp + (accepted and not good), fn + (not accepted and good), \
            tn + (not accepted and not good)
        if accepted != good:
            wrong.append({"id": it["id"], "label": it["label"], "accepted": accepted, "why_labelled": it["reason"]})
    return {"items": len(items), "good": tp + fn, "bad": fp + tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "confusion": {"accepted_good": tp, "accepted_bad": fp, "rejected_good": fn, "rejected_bad": tn},
            "mistakes": wrong}
