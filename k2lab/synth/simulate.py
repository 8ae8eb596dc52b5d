"""LLM-simulated environments: a user simulator with a persona and a stateful tool simulator, over the OpenAI API.

`SimulatedEnvironment` has the environment interface of env.py, async (`await reset()`, `await step(msg)`):
- the user simulator (an LLM with the task's goal and persona) opens the conversation and answers each final
  assistant message; it ends the episode by replying DONE (goal met) or ABANDON (gave up);
- tool calls are validated against their schemas; a seeded share `fault_rate` fails with a transient error;
  MCP tools run for real on their server; every other tool is answered by the tool simulator, an LLM that sees
  the tool's spec, the arguments and the log of earlier calls and results in this episode (its world model),
  and replies {"result": ...}. The outcome it must simulate is drawn (seeded) from `outcome_rates`: a success,
  a partial failure (part of the work done, the rest reported as failed) or an edge case (an empty result, a
  missing record, a limit reached). A reply that is not JSON comes back to the agent as a tool error.
`Usage` of each role is added to `self.usage[role]`.
"""

from __future__ import annotations

import json
import random

import jsonschema

from k2lab.synth.env import screen_call
from k2lab.synth.specs import SpecError, add_usage, parse_json

USER_SIM = "You are the USER SIMULATOR of a data-synthesis pipeline. You play a user, never the assistant."
TOOL_SIM = "You are the TOOL SIMULATOR of a data-synthesis pipeline. Reply with JSON only: {\"result\": ...}."
STOP = {"DONE": "goal met", "ABANDON": "user gave up"}
OUTCOMES = {"success": "a normal success",
            "partial": "a partial failure: part of the work is done, say which part failed and why",
            "edge_case": "an edge case: an empty result, a missing record or a limit reached, as the tool would"}


class Truncated(Exception):
    """A reply cut off by the length limit: the trajectory cannot be used."""


class SimulatedEnvironment:
    def __init__(self, task: dict, agent: dict, catalog: dict[str, dict], user_llm, tool_llm,
                 live_tools: dict | None = None, fault_rate: float = 0.0, seed: int = 0, max_steps: int = 12,
                 outcome_rates: dict[str, float] | None = None):
        self.task, self.agent, self.user_llm, self.tool_llm = task, agent, user_llm, tool_llm
        self.live = live_tools or {}
        self.tools = [catalog[name]["spec"] for name in agent["tools"]]
        self.validators = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"])
                           for t in self.tools}
        self.fault_rate, self.max_steps = fault_rate, max_steps
        self.outcome_rates = outcome_rates or {"partial": 0.05, "edge_case": 0.05}
        if set(self.outcome_rates) - set(OUTCOMES) or sum(self.outcome_rates.values()) > 1:
            raise ValueError(f"outcome_rates: keys from {sorted(OUTCOMES)} summing to <= 1, got {self.outcome_rates}")
        self.rng = random.Random(f"faults:{seed}:{task['task_id']}")
        self.usage: dict[str, dict] = {}

    def _user_prompt(self) -> list[dict]:
        # the simulator sees the conversation from the user's side: roles swapped, tool traffic left out
        flipped = [{"role": "assistant" if m["role"] == "user" else "user", "content": m.get("content") or ""}
                   for m in self.messages[1:] if m["role"] in ("user", "assistant") and m.get("content")]
        brief = (f"{USER_SIM}\nPersona: {self.task['persona']}\nYour goal: {self.task['goal']}\n"
                 "Write the user's next message in the persona's style. When the goal is met reply exactly DONE; "
                 "if the assistant cannot help, reply exactly ABANDON.")
        return [{"role": "system", "content": brief}] + (flipped or [{"role": "user", "content": "(start)"}])

    async def _user_turn(self) -> str:
        r = await self.user_llm.chat(self._user_prompt(), temperature=0.8)
        add_usage(self.usage.setdefault("user_simulator", {}), r)
        if r.finish_reason == "length":
            raise Truncated("user simulator reply truncated")
        return (r.message.get("content") or "").strip()

    async def reset(self) -> tuple[list[dict], list[dict]]:
        self.messages = [{"role": "system", "content": self.agent["system"]}]
        self.steps, self.calls, self.ended = 0, [], None
        opening = await self._user_turn()
        if opening in STOP or not opening:
            raise Truncated(f"user simulator opened with {opening!r}")
        self.messages.append({"role": "user", "content": opening})
        return list(self.messages), self.tools

    async def step(self, message: dict) -> tuple[list[dict], float, bool]:
        message = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "reasoning_content")}
        self.messages.append(message)
        self.steps += 1
        if message.get("tool_calls"):
            obs = [await self._call(tc) for tc in message["tool_calls"]]
        else:
            reply = await self._user_turn()
            if reply in STOP:
                self.ended = STOP[reply]
                obs = []
            else:
                obs = [{"role": "user", "content": reply}]
        self.messages.extend(obs)
        done = self.ended is not None or self.steps >= self.max_steps
        if done and self.ended is None:
            self.ended = "step limit"
        return obs, 0.0, done  # the reward comes from the judges

    async def _call(self, tc: dict) -> dict:
        reply, record, args = screen_call(tc, self.validators, self.calls, self.rng, self.fault_rate)
        if args is None:
            return reply
        name = record["name"]
        if name in self.live:  # a real MCP tool: run it on its server
            record["ok"], record["executed"] = True, "mcp"
            return reply | {"content": await self.live[name](args)}
        return reply | {"content": await self._simulate(name, args, record)}

    async def _simulate(self, name: str, args: dict, record: dict) -> str:
        spec = next(t for t in self.tools if t["function"]["name"] == name)
        log = [{"call": c["name"], "arguments": c.get("arguments"), "result": c.get("result")}
               for c in self.calls if c.get("ok")]
        x, outcome = self.rng.random(), "success"
        for kind, rate in self.outcome_rates.items():
            if x < rate:
                outcome = kind
                break
            x -= rate
        record["outcome"] = outcome
        prompt = (f"Tool: {json.dumps(spec['function'])}\nState so far (earlier calls in this episode): "
                  f"{json.dumps(log)}\nCall: {name}({json.dumps(args)})\nOutcome to simulate: {OUTCOMES[outcome]}\n"
                  'Reply with the tool\'s result as {"result": ...}, consistent with the state.')
        r = await self.tool_llm.chat([{"role": "system", "content": TOOL_SIM}, {"role": "user", "content": prompt}],
                                     temperature=0.3)
        add_usage(self.usage.setdefault("tool_simulator", {}), r)
        try:
            if r.finish_reason == "length":
                raise SpecError("reply truncated")
            result = parse_json(r.message.get("content"), "tool simulator")["result"]
        except (SpecError, KeyError) as e:
            record["fault"] = "simulator"
            return f"error: {name} failed ({e})"
        record.update(ok=True, executed="simulated", arguments=args, result=result)
        return result if isinstance(result, str) else json.dumps(result, sort_keys=True)
