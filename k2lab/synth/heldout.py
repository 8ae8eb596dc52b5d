"""The held-out tool-call eval set: request bodies over tools that never appear in the SFT data.

`heldout_toolcall_set(seed, n)` turns the first turn of `n` tasks of the `toolbox_heldout` domain (held-out
tool names and parameter names, see k2lab.synth.domains.toolbox) into `k2lab eval toolcalls` rows: the
environment's reset messages and tools, `expect` ("tool_calls" for a request a declared tool serves, "stop" for a
request none serves and for small talk), greedy sampling, a generation cap, and `chat_template_kwargs`
`{"thinking": false}` so the server renders the prompt as RL episodes and SFT (thinking off) render it. The same
rows drive the in-training eval (`k2lab sft --eval-toolcalls FILE`, k2lab.train.toolcall_eval) and the server
eval (`k2lab eval toolcalls --dataset FILE`, k2lab.evals.toolcall.run_toolcalls).
"""

from __future__ import annotations

from pathlib import Path

from k2lab.runs import rewrite_jsonl
from k2lab.synth.domains import make_tasks, registry
from k2lab.synth.env import Environment

HELDOUT_DOMAIN = "toolbox_heldout"


def heldout_toolcall_set(seed: int = 0, n: int = 100, max_tokens: int = 64) -> list[dict]:
    """`n` eval request bodies (about 60% expect a call), a function of (seed, n, max_tokens)."""
    if n < 1 or max_tokens < 1:
        raise ValueError(f"need n >= 1 and max_tokens >= 1, got {n}, {max_tokens}")
    domain = registry()[HELDOUT_DOMAIN]
    rows = []
    for task in make_tasks([HELDOUT_DOMAIN], n, seed):
        env = Environment(domain, task)
        messages, tools = env.reset()
        env.close()
        rows.append({"id": task.task_id, "messages": messages, "tools": tools,
                     "expect": "tool_calls" if task.world["kind"] == "call" else "stop",
                     "temperature": 0.0, "max_tokens": max_tokens, "chat_template_kwargs": {"thinking": False}})
    return rows


def write_heldout_toolcall_set(path: str | Path, seed: int = 0, n: int = 100, max_tokens: int = 64) -> Path:
    """The set as JSONL at `path` (written atomically); returns the path."""
    rewrite_jsonl(Path(path), heldout_toolcall_set(seed, n, max_tokens))
    return Path(path)
