"""A stateful store: a parts catalog whose stock the tools read and change (the episode's world model)."""

from __future__ import annotations

import random

from k2lab.data.worlds import catalog
from k2lab.synth.domains import CALCULATE, Domain, calculate, fmt, spec, tolerance
from k2lab.synth.env import Task, ToolError

TOOLS = [
    spec("find_items", "Find catalog items whose name contains the query; returns sku, name, price, stock.",
         {"query": {"type": "string", "minLength": 1}}),
    spec("update_stock", "Add (positive delta) or remove (negative delta) units of an item; returns the new stock.",
         {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "delta": {"type": "integer"}}),
    CALCULATE,
]


class Store(Domain):
    name = "store"
    system = "You are the stock assistant of a hardware parts store. Use the tools to read and change stock."
    tools = TOOLS

    def run_tool(self, state, name, args):
        if name == "calculate":
            return calculate(args["expression"])
        if name == "find_items":
            q = args["query"].lower()
            return [{"sku": k} | v for k, v in sorted(state.items()) if q in v["name"]][:10]
        item = state.get(args["sku"])
        if item is None:
            raise ToolError(f"no item with sku {args['sku']}")
        if item["stock"] + args["delta"] < 0:
            raise ToolError(f"insufficient stock: {args['sku']} has {item['stock']}, cannot remove {-args['delta']}")
        item["stock"] += args["delta"]
        return {"sku": args["sku"], "stock": item["stock"]}

    def check_state(self, state, cp):
        have = state[cp["sku"]]["stock"]
        return have == cp["stock"], f"{cp['sku']} stock is {have}" + ("" if have == cp["stock"] else f", expected {cp['stock']}")

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        items = catalog()
        kind = rng.choice(("stock", "restock_sell", "oversell"))
        skus = rng.sample(sorted(k for k, v in items.items() if v["stock"] > 0), 2)
        (a, ia), (b, ib) = ((s, items[s]) for s in skus)
        if kind == "stock":
            turns = [f"How many {ia['name']}s do we have in stock?"]
            cps = [{"id": "answer", "kind": "contains", "turn": 0, "contains": [str(ia["stock"])]},
                   {"id": "looked_up", "kind": "tools", "sequence": ["find_items"]}]
            world = {"kind": kind, "names": [ia["name"]]}
            criteria = [f"reports {ia['stock']} {ia['name']}s"]
        elif kind == "restock_sell":
            got, sold = rng.randint(1, 40), rng.randint(1, ib["stock"])
            turns = [f"We received {got} {ia['name']}s and sold {sold} {ib['name']}s. "
                     f"Please update the stock and tell me the new levels."]
            new_a, new_b = ia["stock"] + got, ib["stock"] - sold
            cps = [{"id": "stock_a", "kind": "state", "sku": a, "stock": new_a},
                   {"id": "stock_b", "kind": "state", "sku": b, "stock": new_b},
                   {"id": "answer", "kind": "contains", "turn": 0, "contains": [str(new_a), str(new_b)]},
                   {"id": "find_then_update", "kind": "tools",
                    "sequence": ["find_items", "find_items", "update_stock", "update_stock"]}]
            world = {"kind": kind, "names": [ia["name"], ib["name"]], "deltas": [got, -sold]}
            criteria = [f"{a} goes to {new_a}", f"{b} goes to {new_b}", "both new levels are reported"]
        else:  # the customer wants more than there is: the update fails and the solver sells what there is
            want = ia["stock"] + rng.randint(1, 20)
            total = calculate(f"{ia['stock']} * {ia['price']}")["result"]
            turns = [f"A customer wants {want} {ia['name']}s. Please sell them and update the stock.",
                     "What was the total price of what we sold?"]
            cps = [{"id": "sold_out", "kind": "state", "sku": a, "stock": 0},
                   {"id": "reports_shortfall", "kind": "contains", "turn": 0,
                    "contains": [str(ia["stock"]), str(want - ia["stock"])]},
                   {"id": "total_price", "kind": "number", "turn": 1, "number": total, "tolerance": tolerance(total)},
                   {"id": "adapts_after_failure", "kind": "tools",
                    "sequence": ["find_items", "update_stock", "calculate"]}]
            world = {"kind": kind, "names": [ia["name"]], "want": want}
            criteria = [f"sells all {ia['stock']} in stock after the larger sale fails",
                        f"tells the customer {want - ia['stock']} are missing", f"total price {fmt(total)}"]
        rubric = {"success_criteria": criteria, "expected_tools": cps[-1]["sequence"], "checkpoints": cps}
        return self.task(rng, task_id, turns, rubric, {"state": items} | world)

    def plan(self, task: Task, turn: int, results: list[dict]):
        w = task.world
        now = [r for r in results if r["turn"] == turn]
        found = {r["args"]["query"]: r["result"][0] for r in results if r["name"] == "find_items" and r["result"]}
        updates = [r for r in now if r["name"] == "update_stock"]
        missing = [n for n in w["names"] if n not in found]
        if missing:
            if turn > 0:
                return f"I could not look up the {missing[0]}s earlier, so nothing changed."
            return [("find_items", {"query": n}) for n in missing]
        if w["kind"] == "stock":
            item = found[w["names"][0]]
            return f"We have {item['stock']} {item['name']}s in stock (sku {item['sku']})."
        if w["kind"] == "restock_sell":
            if not updates:
                return [("update_stock", {"sku": found[n]["sku"], "delta": d}) for n, d in zip(w["names"], w["deltas"])]
            levels = [f"{found[n]['name']}: {u['result']['stock']}" for n, u in zip(w["names"], updates)]
            return "Stock updated. New levels: " + "; ".join(levels) + "."
        item = found[w["names"][0]]
        if turn == 1:
            if not now:
                sold = [u["args"]["delta"] for u in results if u["name"] == "update_stock" and "error" not in u["result"]]
                if not sold:
                    return "Nothing was sold, so the total is 0."
                return [("calculate", {"expression": f"{-sold[-1]} * {item['price']}"})]
            return f"The total price was {fmt(now[-1]['result']['result'])}."
        if not updates:
            return [("update_stock", {"sku": item["sku"], "delta": -w["want"]})]
        if "error" in updates[-1]["result"] and len(updates) == 1:  # not enough stock: sell what there is
            return [("update_stock", {"sku": item["sku"], "delta": -item["stock"]})]
        return (f"We only had {item['stock']} {item['name']}s, so I sold all {item['stock']}; the customer is "
                f"{w['want'] - item['stock']} short. The stock is now 0.")
