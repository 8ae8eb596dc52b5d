"""Lookups in a fixed world table of invented cities, combined with the calculator."""

from __future__ import annotations

import difflib
import random
import re

from k2lab.data.worlds import cities
from k2lab.synth.domains import CALCULATE, Domain, calculate, fmt, spec, tolerance
from k2lab.synth.env import Task, ToolError

LOOKUP = spec("lookup_city", "Look up a city: country, population, elevation_m, area_km2, utc_offset.",
              {"name": {"type": "string", "minLength": 1}})
_SUGGESTION = re.compile(r"did you mean '([^']+)'")


class Lookup(Domain):
    name = "lookup"
    system = "You answer questions about cities with the lookup_city tool and the calculator. Never guess figures."
    tools = [LOOKUP, CALCULATE]

    def __init__(self):
        self.table = cities()

    def run_tool(self, state, name, args):
        if name == "calculate":
            return calculate(args["expression"])
        if args["name"] in self.table:
            return {"name": args["name"]} | self.table[args["name"]]
        close = difflib.get_close_matches(args["name"], list(self.table), n=1, cutoff=0.75)
        raise ToolError(f"no city named {args['name']!r}" + (f"; did you mean '{close[0]}'?" if close else ""))

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        a, b = rng.sample(sorted(self.table), 2)
        ra, rb = self.table[a], self.table[b]
        # a user who misspells the city: the lookup fails with a suggestion and the solver follows it
        typed = a if rng.random() < 0.7 else a[:-2] + a[-1]
        kind = rng.choice(("population", "higher", "density"))
        if kind == "population":
            turns = [f"What is the population of {typed}?"]
            cps = [{"id": "answer", "kind": "number", "turn": 0, "number": ra["population"], "tolerance": 0},
                   {"id": "looked_up", "kind": "tools", "sequence": ["lookup_city"]}]
            criteria = [f"states {ra['population']}"]
        elif kind == "higher":
            hi = a if ra["elevation_m"] >= rb["elevation_m"] else b
            diff = abs(ra["elevation_m"] - rb["elevation_m"])
            turns = [f"Which is higher above sea level, {typed} or {b}, and by how many meters?"]
            cps = [{"id": "which", "kind": "contains", "turn": 0, "contains": [hi]},
                   {"id": "difference", "kind": "number", "turn": 0, "number": diff, "tolerance": 0},
                   {"id": "lookup_then_subtract", "kind": "tools", "sequence": ["lookup_city", "lookup_city", "calculate"]}]
            criteria = [f"names {hi}", f"by {diff} m"]
        else:
            density = ra["population"] / ra["area_km2"]
            turns = [f"What is the population density of {typed} in people per square kilometer?"]
            cps = [{"id": "answer", "kind": "number", "turn": 0, "number": round(density, 2),
                    "tolerance": tolerance(density)},
                   {"id": "lookup_then_divide", "kind": "tools", "sequence": ["lookup_city", "calculate"]}]
            criteria = [f"states about {fmt(density)} people per km2"]
        rubric = {"success_criteria": criteria, "expected_tools": cps[-1]["sequence"], "checkpoints": cps}
        return self.task(rng, task_id, turns, rubric, {"kind": kind, "cities": [typed, b][:2 if kind == "higher" else 1]})

    def plan(self, task: Task, turn: int, results: list[dict]):
        w = task.world
        looked = [r for r in results if r["name"] == "lookup_city"]
        found = {r["result"]["name"]: r["result"] for r in looked if "error" not in r["result"]}
        asked = {r["args"]["name"] for r in looked}
        todo = []
        for name in w["cities"]:
            if name in found:
                continue
            err = next((r["result"]["error"] for r in looked if r["args"]["name"] == name), None)
            if err is None:
                todo.append(name)
                continue
            hint = _SUGGESTION.search(err)
            if not hint:
                return f"I could not find a city called {name}; could you check the spelling?"
            if hint.group(1) not in asked:
                todo.append(hint.group(1))
        if todo:
            return [("lookup_city", {"name": n}) for n in todo]
        cs = [found[n] if n in found else next(c for c in found.values() if c["name"] not in w["cities"])
              for n in w["cities"]]
        calc = [r["result"]["result"] for r in results if r["name"] == "calculate"]
        if w["kind"] == "population":
            return f"{cs[0]['name']} has a population of {cs[0]['population']}."
        if w["kind"] == "density":
            if not calc:
                return [("calculate", {"expression": f"{cs[0]['population']} / {cs[0]['area_km2']}"})]
            return f"{cs[0]['name']} has about {fmt(calc[-1])} people per square kilometer."
        hi, lo = sorted(cs, key=lambda c: -c["elevation_m"])
        if not calc:
            return [("calculate", {"expression": f"{hi['elevation_m']} - {lo['elevation_m']}"})]
        return f"{hi['name']} is higher, by {fmt(calc[-1])} meters ({hi['elevation_m']} m vs {lo['elevation_m']} m)."
