"""Tool specs from three sources, validated and de-duplicated into one catalog.

- real MCP servers (through the agents' MCP client): `list_tools`, and the live `Tool`s kept so trajectories
  execute them for real;
- OpenAI-format JSON files (a list of tool definitions, or an object with `tools`);
- synthetic tools evolved by an LLM through a hierarchy: category -> application domains -> tools, each tool
  with a name, description, JSON schema and the state it reads and changes.

A catalog entry is {name, description, source, domain, spec (OpenAI function tool), reads, changes}. Every
schema is checked against the JSON Schema meta-schema (Draft 2020-12) and must describe an object; near
duplicates (same name, or hashed bag-of-words cosine >= 0.9 with an earlier tool) are dropped with a reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np

from k2lab.synth.card import embed

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DESIGNER = "You are the TOOL DESIGNER of a data-synthesis pipeline. Reply with JSON only, no prose."
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def add_usage(usage: dict, r) -> dict:
    """Add one `ChatResult`'s tokens, cost, call and retries to a usage total (every stage keeps its own)."""
    for k, v in (("prompt_tokens", r.usage.get("prompt_tokens", 0)), ("completion_tokens",
                 r.usage.get("completion_tokens", 0)), ("cost_usd", r.usage.get("cost_usd", 0.0)), ("calls", 1),
                 ("retries", r.retries)):
        usage[k] = usage.get(k, 0) + v
    return usage


class SpecError(ValueError):
    """A tool definition or an LLM reply that cannot be used; the message is the rejection reason."""


def parse_json(text: str | None, what: str) -> dict:
    """A JSON object from an LLM reply (a ``` fence around it is allowed)."""
    try:
        obj = json.loads(_FENCE.sub("", (text or "").strip()))
    except json.JSONDecodeError as e:
        raise SpecError(f"{what}: reply is not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{what}: reply is JSON but not an object")
    return obj


def validate_tool(t: dict, source: str, domain: str) -> dict:
    """A catalog entry from an OpenAI tool definition (or its bare `function` part); SpecError says what is wrong."""
    fn = t.get("function", t) if isinstance(t, dict) else None
    if not isinstance(fn, dict):
        raise SpecError(f"tool is not an object: {str(t)[:60]}")
    name, desc, params = fn.get("name"), fn.get("description"), fn.get("parameters", {"type": "object"})
    if not isinstance(name, str) or not NAME.match(name):
        raise SpecError(f"tool name {name!r} must match {NAME.pattern}")
    if not isinstance(desc, str) or not desc.strip():
        raise SpecError(f"tool {name}: needs a description")
    if not isinstance(params, dict) or params.get("type") != "object":
        raise SpecError(f"tool {name}: parameters must be a JSON schema of type object")
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as e:
        raise SpecError(f"tool {name}: invalid JSON schema ({e.message})") from None
    return {"name": name, "description": desc.strip(), "source": source, "domain": domain,
            "spec": {"type": "function", "function": {"name": name, "description": desc.strip(), "parameters": params}},
            "reads": list(t.get("reads", [])), "changes": list(t.get("changes", []))}


def from_json_file(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(catalog entries, rejected {name, reason}) from an OpenAI-format JSON tools file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: cannot read a JSON tools file ({e})") from None
    items = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SpecError(f"{path}: expected a list of tools or an object with 'tools'")
    return _validate_all(items, "json", path.stem)


def from_mcp(tools) -> list[dict]:
    """Catalog entries from the agents' MCP `Tool`s (their servers stay open to execute them)."""
    return [validate_tool(t.spec, "mcp", "mcp") for t in tools]


def _validate_all(items: list, source: str, domain: str) -> tuple[list[dict], list[dict]]:
    ok, bad = [], []
    for t in items:
        try:
            ok.append(validate_tool(t, source, domain))
        except SpecError as e:
            bad.append({"stage": "tools", "source": source, "domain": domain, "reason": str(e)})
    return ok, bad


async def _ask_json(llm, prompt: str, what: str, attempts: int = 2) -> tuple[dict, dict]:
    """Ask for a JSON object; a non-JSON or truncated reply is asked again once, then SpecError."""
    usage: dict = {}
    note = ""
    for _ in range(attempts):
        r = await llm.chat([{"role": "system", "content": DESIGNER}, {"role": "user", "content": prompt + note}],
                           temperature=0.7)
        add_usage(usage, r)
        try:
            if r.finish_reason == "length":
                raise SpecError(f"{what}: reply truncated (finish_reason length)")
            return parse_json(r.message.get("content"), what), usage
        except SpecError as e:
            err = e
            note = f"\n\nYour previous reply was rejected: {e}. Reply with one complete JSON object."
    raise SpecError(str(err))


async def evolve(llm, categories: list[str], domains_per_category: int = 2,
                 tools_per_domain: int = 4) -> tuple[list[dict], list[dict], dict]:
    """Synthetic tools: category -> application domains -> tools. Returns (entries, rejected, usage)."""
    tools, rejected, usage = [], [], {}

    def add(u):
        for k, v in u.items():
            usage[k] = usage.get(k, 0) + v
    for cat in categories:
        try:
            obj, u = await _ask_json(llm, f"Category: {cat}\nPropose {domains_per_category} application domains "
                                          'as {"domains": [{"name": str, "description": str}]}.', f"domains of {cat}")
            add(u)
            domains = [d for d in obj.get("domains", []) if isinstance(d, dict) and isinstance(d.get("name"), str)]
        except SpecError as e:
            rejected.append({"stage": "tools", "source": "synthetic", "domain": cat, "reason": str(e)})
            continue
        for d in domains[:domains_per_category]:
            try:
                obj, u = await _ask_json(llm, f"Domain: {d['name']} ({d.get('description', '')}), category {cat}.\n"
                                              f"Design {tools_per_domain} tools as "
                                              '{"tools": [{"name", "description", "parameters" (JSON schema), '
                                              '"reads": [state], "changes": [state]}]}.', f"tools of {d['name']}")
                add(u)
            except SpecError as e:
                rejected.append({"stage": "tools", "source": "synthetic", "domain": d["name"], "reason": str(e)})
                continue
            ok, bad = _validate_all(obj.get("tools") if isinstance(obj.get("tools"), list) else [], "synthetic",
                                    d["name"])
            tools += ok
            rejected += bad
    return tools, rejected, usage


def dedupe(entries: list[dict], threshold: float = 0.9) -> tuple[list[dict], list[dict]]:
    """Keep the first of each group of same-named or near-identical tools (hashed bag-of-words cosine)."""
    if not entries:
        return [], []
    x = embed([f"{e['name'].replace('_', ' ')} {e['description']}" for e in entries])
    kept, dropped, names = [], [], set()
    for i, e in enumerate(entries):
        sims = x[kept] @ x[i] if kept else np.zeros(0)
        if e["name"] in names or (len(sims) and sims.max() >= threshold):
            twin = e["name"] if e["name"] in names else entries[kept[int(sims.argmax())]]["name"]
            dropped.append({"stage": "dedupe", "source": e["source"], "domain": e["domain"],
                            "reason": f"{e['name']}: near-duplicate of {twin}"})
        else:
            kept.append(i)
            names.add(e["name"])
    return [entries[i] for i in kept], dropped
