"""The rule-based solver: the scripted teacher of the embedded domains. It is a program, not a model.

It reads the conversation the way a model would (the user's turn, its own earlier tool calls and their results)
and asks the domain's `plan(task, turn, results)` for the next step: tool calls or the final answer
(`results`: every successful or edge-case result so far, each with its turn). The
recovery behaviour lives here, once for all domains: a call that failed with a transient error is retried as
it was, up to `MAX_RETRIES` times; after that the solver gives up and says so (that trajectory fails its
rubric and is rejected, as a model's would). Edge-case errors (a missing city, too little stock) are passed to
the domain's plan, which adapts.
"""

from __future__ import annotations

import json

from k2lab.synth.env import TRANSIENT

NAME = "rule-based solver"
MAX_RETRIES = 2


def _calls(name_args: list[tuple[str, dict]], start: int) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"functions.{name}:{start + i}", "type": "function",
         "function": {"name": name, "arguments": json.dumps(args, sort_keys=True)}}
        for i, (name, args) in enumerate(name_args)]}


def solve(domain, task, messages: list[dict]) -> dict:
    """The next assistant message for the conversation `messages` (which ends in a user or tool message)."""
    n_calls = sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")
    replies = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    turn, results, attempts, failed = -1, [], {}, []
    for m in messages:
        if m["role"] == "user":  # a new turn: failures of the last one are not retried any more
            turn, failed = turn + 1, []
        for tc in m.get("tool_calls") or []:
            key = (tc["function"]["name"], tc["function"]["arguments"])
            content = replies.get(tc["id"], "")
            if content.startswith(TRANSIENT):
                attempts[key] = attempts.get(key, 0) + 1
                failed.append(key)
                continue
            failed = [k for k in failed if k != key]
            result = {"error": content[len("error: "):]} if content.startswith("error:") else json.loads(content)
            results.append({"turn": turn, "name": key[0], "args": json.loads(key[1]), "result": result})
    if failed:  # retry what failed transiently in the last round, unless it keeps failing
        worst = max(failed, key=lambda k: attempts[k])
        if attempts[worst] > MAX_RETRIES:
            return {"role": "assistant", "content": f"I'm sorry, I could not finish this: the {worst[0]} tool failed "
                                                    f"{attempts[worst]} times in a row. Please try again later."}
        return _calls([(name, json.loads(args)) for name, args in dict.fromkeys(failed)], n_calls)
    step = domain.plan(task, turn, results)
    if isinstance(step, str):
        return {"role": "assistant", "content": step}
    return _calls(step, n_calls)
