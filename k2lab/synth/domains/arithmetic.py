"""Arithmetic and unit conversion: a calculator and a unit converter, single- and multi-turn tasks."""

from __future__ import annotations

import random

from k2lab.synth.domains import CALCULATE, Domain, calculate, fmt, spec, tolerance
from k2lab.synth.env import Task, ToolError

# unit -> (dimension, factor to the dimension's base unit); temperature is affine and handled apart
UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mi": ("length", 1609.344),
         "ft": ("length", 0.3048), "in": ("length", 0.0254), "kg": ("mass", 1.0), "g": ("mass", 0.001),
         "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125), "l": ("volume", 1.0),
         "ml": ("volume", 0.001), "gal": ("volume", 3.785411784), "C": ("temperature", 1.0),
         "F": ("temperature", 1.0), "K": ("temperature", 1.0)}
NAMES = {"m": "meters", "km": "kilometers", "cm": "centimeters", "mi": "miles", "ft": "feet", "in": "inches",
         "kg": "kilograms", "g": "grams", "lb": "pounds", "oz": "ounces", "l": "liters", "ml": "milliliters",
         "gal": "US gallons", "C": "degrees Celsius", "F": "degrees Fahrenheit", "K": "kelvin"}
PAIRS = (("mi", "km"), ("km", "mi"), ("ft", "m"), ("in", "cm"), ("lb", "kg"), ("kg", "lb"), ("oz", "g"),
         ("gal", "l"), ("l", "gal"), ("F", "C"), ("C", "F"), ("C", "K"))

CONVERT = spec("convert_units", "Convert a value between units of the same dimension.",
               {"value": {"type": "number"}, "from_unit": {"type": "string", "enum": sorted(UNITS)},
                "to_unit": {"type": "string", "enum": sorted(UNITS)}})


def convert(value: float, from_unit: str, to_unit: str) -> dict:
    (dim_a, fa), (dim_b, fb) = UNITS[from_unit], UNITS[to_unit]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    if dim_a == "temperature":
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        out = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    else:
        out = value * fa / fb
    return {"value": round(out, 6), "unit": to_unit}


class Arithmetic(Domain):
    name = "arithmetic"
    system = "You are a careful assistant with a calculator and a unit converter. Use the tools for every number."
    tools = [CALCULATE, CONVERT]

    def run_tool(self, state, name, args):
        return calculate(args["expression"]) if name == "calculate" else convert(**args)

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        kind = rng.choice(("convert", "expression", "trip"))
        if kind == "convert":
            a, b = rng.choice(PAIRS)
            v = rng.randint(1, 400) / rng.choice((1, 4))
            gold = convert(v, a, b)["value"]
            turns = [f"How many {NAMES[b]} is {fmt(v)} {NAMES[a]}?"]
            cps = [{"id": "answer", "kind": "number", "turn": 0, "number": gold, "tolerance": tolerance(gold)},
                   {"id": "uses_converter", "kind": "tools", "sequence": ["convert_units"]}]
            world = {"kind": kind, "value": v, "from": a, "to": b}
            criteria = [f"states that {fmt(v)} {a} is {fmt(gold)} {b}"]
        elif kind == "expression":
            x, y, z, w = (rng.randint(2, 99) for _ in range(4))
            expr = f"({x} * {y} - {z}) / {w}"
            gold = calculate(expr)["result"]
            turns = [f"What is ({x} times {y} minus {z}) divided by {w}?"]
            cps = [{"id": "answer", "kind": "number", "turn": 0, "number": gold, "tolerance": tolerance(gold)},
                   {"id": "uses_calculator", "kind": "tools", "sequence": ["calculate"]}]
            world = {"kind": kind, "expression": expr}
            criteria = [f"states the value {fmt(gold)}"]
        else:
            v, days = rng.randint(3, 300), rng.randint(2, 9)
            per_day = convert(v, "mi", "km")["value"]
            total = calculate(f"{per_day} * {days}")["result"]
            meters = convert(total, "km", "m")["value"]
            turns = [f"I drove {v} miles on each of {days} days. How many kilometers is that in total?",
                     "And how many meters is that?"]
            cps = [{"id": "total_km", "kind": "number", "turn": 0, "number": total, "tolerance": tolerance(total)},
                   {"id": "total_m", "kind": "number", "turn": 1, "number": meters, "tolerance": tolerance(meters)},
                   {"id": "convert_then_multiply", "kind": "tools",
                    "sequence": ["convert_units", "calculate", "convert_units"]}]
            world = {"kind": kind, "value": v, "days": days}
            criteria = [f"states {fmt(total)} km in total", f"then states {fmt(meters)} m"]
        rubric = {"success_criteria": criteria, "expected_tools": cps[-1]["sequence"], "checkpoints": cps}
        return self.task(rng, task_id, turns, rubric, world)

    def plan(self, task: Task, turn: int, results: list[dict]):
        w = task.world
        now = [r for r in results if r["turn"] == turn]
        last = now[-1]["result"] if now else None
        if w["kind"] == "convert":
            if not now:
                return [("convert_units", {"value": w["value"], "from_unit": w["from"], "to_unit": w["to"]})]
            return f"{fmt(w['value'])} {NAMES[w['from']]} is {fmt(last['value'])} {NAMES[w['to']]}."
        if w["kind"] == "expression":
            if not now:
                return [("calculate", {"expression": w["expression"]})]
            return f"{w['expression']} = {fmt(last['result'])}"
        if turn == 0:
            if not now:
                return [("convert_units", {"value": w["value"], "from_unit": "mi", "to_unit": "km"})]
            if now[-1]["name"] == "convert_units":
                return [("calculate", {"expression": f"{last['value']} * {w['days']}"})]
            return (f"{w['value']} miles is {fmt(now[0]['result']['value'])} km, so over {w['days']} days "
                    f"you drove {fmt(last['result'])} km in total.")
        if not now:  # the total comes from the first turn's calculation
            totals = [r["result"]["result"] for r in results if r["name"] == "calculate"]
            if not totals:
                return "I could not work out the total before, so I cannot convert it yet."
            return [("convert_units", {"value": totals[-1], "from_unit": "km", "to_unit": "m"})]
        return f"That is {fmt(last['value'])} meters."
