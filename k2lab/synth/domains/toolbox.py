"""Procedurally generated tools: many invented tools, so SFT teaches calling a *declared* tool, not five domains'.

A tool is `{verb}_{noun}` with 1-3 parameters (names from a word pool; types integer, number, boolean, string or
a string enum; sometimes one optional), all a function of the task's seeded RNG. The nouns and the parameter
names are split once, by a fixed rule, into a training pool and a held-out pool that share no word: the
`toolbox` domain (SFT data, RL) only ever draws from the training pool, `toolbox_heldout` (the held-out tool-call
eval, `k2lab.synth.heldout`) only from the held-out one, so no held-out tool name or parameter name appears in
the training data (the verbs and the value words are shared: they are the request's language, not the tools').

Every task declares 2-3 tools, and its first user turn is one of:
- `call`: a request for one declared tool with every required value (and sometimes the optional one) spelled out;
  the teacher calls it, reads the result and reports it; sometimes the user then says thanks (a reply, no call);
- `no_tool`: a request for a noun no declared tool handles: the teacher answers directly that it cannot;
- `chat`: small talk: the teacher answers directly.
So the data holds the negatives a trigger F1 needs as well as the calls. The tools run for real: a call
returns a receipt number derived from its arguments, and the final answer must state it.
"""

from __future__ import annotations

import hashlib
import json
import random

from k2lab.synth.domains import Domain, spec
from k2lab.synth.env import Task

VERBS = ("count", "paint", "inspect", "repair", "order", "rent", "clean", "move", "sort", "weigh", "polish",
         "stack", "ship", "track", "reserve", "measure")
NOUNS = ("lanterns", "mirrors", "kettles", "ladders", "banners", "barrels", "candles", "carpets", "compasses",
         "crates", "drums", "easels", "fences", "flags", "gears", "globes", "hammers", "helmets", "jars", "kites",
         "lamps", "levers", "maps", "masks", "nets", "oars", "pipes", "pumps", "quills", "rafts", "ropes", "saddles",
         "shields", "sieves", "sleds", "spools", "statues", "tents", "tiles", "torches", "trays", "valves", "vases",
         "wagons", "wheels", "whistles", "anchors", "baskets", "bells", "boots", "bricks", "buckets", "cables",
         "chairs", "clocks", "coins", "cups", "doors", "benches", "bottles")
PARAMS = ("zone", "color", "size", "limit", "owner", "priority", "note", "depth", "width", "height", "shelf", "room",
          "floor", "batch", "code", "grade", "speed", "weight", "budget", "deadline", "region", "season", "material",
          "style", "pattern", "quantity", "level", "angle", "margin", "volume", "tone", "theme", "mode", "origin",
          "route", "window", "slot", "tier", "rank", "score", "ratio", "quota", "channel", "tag", "lane", "sector",
          "cycle", "urgent")
WORDS = ("amber", "north", "velvet", "quick", "silver", "harbor", "maple", "copper", "quiet", "delta", "ember",
         "frost", "garden", "indigo", "juniper", "lunar", "meadow", "nickel", "orchid", "pebble", "river", "saffron",
         "timber", "violet", "willow", "yonder", "cobalt", "dune", "fern", "granite")
TYPES = ("integer", "number", "boolean", "string", "enum")
SPLITS = ("train", "heldout")


def pool(words: tuple[str, ...], split: str) -> list[str]:
    """The fixed split of a word pool: every fourth word is held out."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [w for i, w in enumerate(words) if (i % 4 == 3) == (split == "heldout")]


def make_tool(rng: random.Random, split: str, verb: str, noun: str) -> dict:
    """One tool spec `{verb}_{noun}` whose parameters come from the split's pool."""
    names = rng.sample(pool(PARAMS, split), rng.randint(1, 3))
    props = {}
    for name in names:
        kind = rng.choice(TYPES)
        props[name] = ({"type": "string", "enum": sorted(rng.sample(WORDS, rng.randint(2, 3)))} if kind == "enum"
                       else {"type": kind})
    optional = names[-1:] if len(names) > 1 and rng.random() < 0.4 else []
    return spec(f"{verb}_{noun}", f"{verb.capitalize()} {noun}.", props, [n for n in names if n not in optional])


def value(rng: random.Random, schema: dict):
    if "enum" in schema:
        return rng.choice(schema["enum"])
    return {"integer": lambda: rng.randint(1, 99), "number": lambda: rng.randint(1, 80) + rng.choice((0.25, 0.5)),
            "boolean": lambda: rng.random() < 0.5, "string": lambda: rng.choice(WORDS)}[schema["type"]]()


def spoken(name: str, v, schema: dict) -> str:
    """How the user says one argument: strings quoted (enum options are not: the declaration lists them)."""
    if isinstance(v, bool):
        return f"{name} {'true' if v else 'false'}"
    return f'{name} "{v}"' if schema.get("type") == "string" and "enum" not in schema else f"{name} {v}"


def receipt(name: str, args: dict) -> int:
    """The tool's result: a receipt number that is a function of the call."""
    key = json.dumps([name, args], sort_keys=True).encode()
    return 1000 + int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 9000


CALL_TEMPLATES = ("Please {verb} the {noun} with {args}.", "Can you {verb} the {noun}? Use {args}.",
                  "I need to {verb} the {noun}: {args}.", "{Verb} the {noun}, {args}.")
NO_TOOL_TEMPLATES = ("Please {verb} the {noun}.", "Can you {verb} the {noun} for me?", "I need to {verb} the {noun}.")
# small talk: (the user's line, the teacher's reply, the word a fitting reply must contain: the rubric's check,
# so a garbled reply does not pass as small talk)
CHAT = (("Hello! Who are you?", "Hello! I am an assistant; I can use the tools I was given.", "assistant"),
        ("Thanks, that is all for today.", "You're welcome. Goodbye!", "welcome"),
        ("How are you today?", "I am fine, thank you. What can I do for you?", "fine"),
        ("Good morning!", "Good morning! How can I help?", "morning"),
        ("What is your name?", "I am an assistant with a few tools.", "assistant"))


class Toolbox(Domain):
    """Tasks over procedurally generated tools of one split (see the module docstring)."""

    system = "Call a tool when the request needs one; otherwise answer directly."

    def __init__(self, split: str = "train"):
        self.split, self.name = split, "toolbox" if split == "train" else f"toolbox_{split}"
        self.nouns = pool(NOUNS, split)

    def task_tools(self, task: Task) -> list[dict]:
        return task.world["tools"]

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        nouns = rng.sample(self.nouns, 4)
        tools = [make_tool(rng, self.split, rng.choice(VERBS), noun) for noun in nouns[:rng.randint(2, 3)]]
        kind = rng.choices(("call", "no_tool", "chat"), weights=(0.6, 0.25, 0.15))[0]
        world: dict = {"kind": kind, "tools": tools}
        if kind == "call":
            tool = rng.choice(tools)["function"]
            props, required = tool["parameters"]["properties"], tool["parameters"]["required"]
            args = {k: value(rng, s) for k, s in props.items() if k in required or rng.random() < 0.5}
            verb, noun = tool["name"].split("_", 1)
            said = ", ".join(spoken(k, args[k], props[k]) for k in sorted(args))
            turns = [rng.choice(CALL_TEMPLATES).format(verb=verb, Verb=verb.capitalize(), noun=noun, args=said)]
            number = receipt(tool["name"], args)
            if rng.random() < 0.25:
                turns.append("Thanks!")
            world |= {"tool": tool["name"], "args": args}
            cps = [{"id": "calls_the_tool", "kind": "tools", "sequence": [tool["name"]]},
                   {"id": "reports_receipt", "kind": "number", "turn": 0, "number": number, "tolerance": 0}]
            criteria = [f"calls {tool['name']} with {json.dumps(args, sort_keys=True)}", f"reports receipt {number}"]
        elif kind == "no_tool":
            verb, noun = rng.choice(VERBS), nouns[3]  # a noun no declared tool handles
            turns = [rng.choice(NO_TOOL_TEMPLATES).format(verb=verb, noun=noun)]
            world |= {"verb": verb, "noun": noun}
            cps = [{"id": "says_it_cannot", "kind": "contains", "turn": 0, "contains": [noun], "not_abstain": False}]
            criteria = [f"says no tool can {verb} {noun}, without calling one"]
        else:
            line, _, word = CHAT[rng.randrange(len(CHAT))]
            turns = [line]
            cps = [{"id": "replies", "kind": "contains", "turn": 0, "contains": [word]}]
            criteria = ["replies without calling a tool"]
        if kind != "call":
            cps.append({"id": "no_call", "kind": "state", "calls": 0})
        rubric = {"success_criteria": criteria, "expected_tools": cps[0].get("sequence", []), "checkpoints": cps}
        return self.task(rng, task_id, turns, rubric, world)

    def initial_state(self, task: Task) -> dict:
        return {"calls": 0}

    def run_tool(self, state, name, args):
        state["calls"] += 1
        return {"status": "done", "receipt": receipt(name, args)}

    def check_state(self, state, cp: dict) -> tuple[bool, str]:
        return state["calls"] == cp["calls"], f"made {state['calls']} tool calls (expected {cp['calls']})"

    def plan(self, task: Task, turn: int, results: list[dict]):
        w = task.world
        if turn > 0:
            return "You're welcome!"
        if w["kind"] == "chat":
            return _chat_reply(task.turns[0])
        if w["kind"] == "no_tool":
            return f"Sorry, none of my tools can {w['verb']} the {w['noun']}."
        if not results:
            return [(w["tool"], w["args"])]
        return f"Done: the receipt number is {results[-1]['result']['receipt']}."


def _chat_reply(said: str) -> str:
    """The reply to a small-talk line, whatever persona wrapped it."""
    return next(reply for line, reply, _ in CHAT if line.lower().rstrip(".!?") in said.lower())
