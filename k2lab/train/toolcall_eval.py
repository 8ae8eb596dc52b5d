"""The tool-call eval during SFT: `k2lab eval toolcalls`' request bodies, generated in process.

The eval set is request bodies with `expect` (what `k2lab eval toolcalls` replays against a server, for example
the held-out tool set of `k2lab.synth.heldout`), or, when no set is given, the held-out conversations' first
assistant decisions turned into such requests (`requests_from_conversations`). Each request is rendered with
its tools, its `chat_template_kwargs` and the generation prompt exactly as the server renders it; the model
answers greedily (the request's `max_tokens`, else a short cap) through the in-process generator, and the output
is parsed and scored as `k2lab eval toolcalls` scores a server's responses (k2lab.evals.toolcall.compute_results):
trigger precision/recall/F1 of "decided to call a tool" (opened a tool-call section) against `expect`, and schema
accuracy: the share of those answers whose calls parse, name a declared tool and validate against its JSON schema
(a cut-off or malformed call counts as triggered but not schema-valid, where a server would report
finish_reason "length" or "stop").
"""

from __future__ import annotations

from pathlib import Path

from k2lab.evals.toolcall import compute_results
from k2lab.serve.rollout import InProcessGenerator, RolloutParams
from k2lab.serve.streaming import finish_reason
from k2lab.tokenizer.chat import segments
from k2lab.tokenizer.toolcalls import parse

TOOL_SECTION = "<|tool_calls_section_begin|>"
METRICS = ("toolcall_f1", "toolcall_precision", "toolcall_recall", "toolcall_schema_accuracy")


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None,
               template_kwargs: dict | None = None) -> list[int]:
    """The chat rendering with the generation prompt as ids (as the server's chat_ids): markers are special
    tokens, text never is."""
    ids: list[int] = []
    for text, is_marker, _ in segments(messages, tools, add_generation_prompt=True, chat_format=tokenizer.chat_format,
                                       **(template_kwargs or {})):
        ids.extend([tokenizer.special_tokens[text]] if is_marker else tokenizer.encode(text))
    return ids


def requests_from_conversations(conversations: list[dict], thinking: bool) -> list[dict]:
    """Eval requests from conversations: the messages before the first assistant turn, `expect` from that turn."""
    out = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"]
        first = next(k for k, m in enumerate(messages) if m.get("role") == "assistant")
        out.append({"id": str(i), "messages": messages[:first], "tools": conv.get("tools") or None,
                    "expect": "tool_calls" if messages[first].get("tool_calls") else "stop",
                    "chat_template_kwargs": {"thinking": thinking}})
    return out


class ToolcallEval:
    """`evals(model) -> {toolcall_f1, ...}` for the training loop, over eval requests (see the module docstring)."""

    def __init__(self, requests: list[dict], tokenizer, max_new_tokens: int, max_len: int):
        """max_new_tokens: the cap of requests that set no max_tokens; max_len: the model's positions (prompts
        that leave no room for their cap are left out)."""
        self.tokenizer = tokenizer
        self.rows, self.prompts, self.caps, self.reference = [], [], [], {}
        for row in requests:
            ids = prompt_ids(tokenizer, row["messages"], row.get("tools") or None, row.get("chat_template_kwargs"))
            cap = row.get("max_tokens") or max_new_tokens
            if len(ids) + cap > max_len:
                continue
            self.rows.append({"id": str(row["id"]), "tools": row.get("tools")})
            self.prompts.append(ids)
            self.caps.append(cap)
            self.reference[str(row["id"])] = row["expect"]

    def generate(self, model) -> list[tuple[list[int], str]]:
        """Greedy answers to the prompts: (completion ids without the stop id, "stop" or "length")."""
        tok = self.tokenizer
        generator = InProcessGenerator(model, (tok.eos_id, tok.im_end_id))
        samples = [None] * len(self.prompts)
        for cap in sorted(set(self.caps)):  # one batch per cap (a set usually has one)
            which = [i for i, c in enumerate(self.caps) if c == cap]
            out = generator.generate([self.prompts[i] for i in which],
                                     params=RolloutParams(max_new_tokens=cap, temperature=0.0))
            for i, smp in zip(which, out):
                samples[i] = smp
        return [(smp.completion_ids[:-1] if smp.finish_reason == "stop" else smp.completion_ids, smp.finish_reason)
                for smp in samples]

    def score(self, outputs: list[tuple[list[int], str]]) -> dict:
        """The metrics of one answer per prompt, parsed and recorded as a server's responses would be."""
        tok, responses = self.tokenizer, {}
        for row, prompt, (ids, reason) in zip(self.rows, self.prompts, outputs, strict=True):
            text = b"".join(tok.id_to_bytes(i) for i in ids).decode("utf-8", errors="replace")
            parsed = parse(text, tools=row["tools"], in_reasoning=prompt[-1] == tok.special_tokens.get("<think>"))
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in parsed.tool_calls]
            # the trigger is the decision to call (a tool-call section opened), even if the call is cut off or
            # malformed; such a call then counts against schema accuracy (compute_results: no valid call)
            attempted = bool(row["tools"]) and TOOL_SECTION in text
            responses[row["id"]] = {"finish_reason": "tool_calls" if attempted else finish_reason(reason, False),
                                    "content": parsed.content, "tool_calls": calls}
        results = compute_results(self.rows, responses, self.reference)
        prf = results["finish_reason"]
        return {"toolcall_f1": prf["f1"], "toolcall_precision": prf["precision"], "toolcall_recall": prf["recall"],
                "toolcall_schema_accuracy": results["schema_accuracy"]}

    def __call__(self, model) -> dict:
        if not self.rows:
            return {}
        was_training = model.training
        model.eval()
        try:
            return self.score(self.generate(model))
        finally:
            model.train(was_training)


def plot_toolcalls(run_dir: Path, records: list[dict]) -> Path | None:
    """plots/toolcalls.png: trigger F1, precision, recall and schema accuracy over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "toolcall_f1" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in METRICS:
        pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key.removeprefix("toolcall_"))
    ax.set(xlabel="step", ylim=(-0.05, 1.05), title="tool-call eval (held-out conversations)")
    ax.legend()
    out = Path(run_dir) / "plots" / "toolcalls.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
