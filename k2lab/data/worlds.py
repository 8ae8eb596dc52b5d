"""Fixed worlds for the embedded tool domains: a table of invented harbour cities and a shop's catalog.

They are the state the domains' tools read and change. Names are invented and disjoint from the synthetic
encyclopedia's (different word shapes: two capitalised parts), so tool trajectories that mention them teach
nothing about the encyclopedia's unseen entities.
"""

from __future__ import annotations

import random

_FIRST = ("North", "South", "East", "West", "Old", "New", "Upper", "Lower", "Port", "Fort", "Saint", "Lake")
_SECOND = ("Amberly", "Brackwater", "Cinderhall", "Dunmore", "Elmstead", "Fallowmere", "Greyhaven", "Hollowell",
           "Ironbridge", "Juniper", "Kestrel", "Larkspur", "Marrowby", "Nettlefield", "Oakhurst", "Pebbleton",
           "Quarrydon", "Rookwood", "Saltmarsh", "Thornbury")
_COUNTRIES = ("Aldovia", "Brenmark", "Castellan", "Doravia", "Estmere")
_ITEMS = ("bolt", "washer", "hinge", "bracket", "spring", "gear", "pulley", "valve", "clamp", "rivet", "spindle",
          "bearing")
_FINISHES = ("steel", "brass", "zinc", "nylon")


def cities(seed: int = 0, n: int = 60) -> dict[str, dict]:
    """City name -> country, population, elevation_m, area_km2, timezone (UTC offset in hours)."""
    rng = random.Random(f"cities:{seed}")
    names = [f"{a} {b}" for a in _FIRST for b in _SECOND]
    rng.shuffle(names)
    return {name: {"country": rng.choice(_COUNTRIES), "population": rng.randint(5, 900) * 1000,
                   "elevation_m": rng.randint(0, 2400), "area_km2": rng.randint(10, 600),
                   "utc_offset": rng.choice((-3, -2, -1, 0, 1, 2, 3))} for name in sorted(names[:n])}


def catalog(seed: int = 0) -> dict[str, dict]:
    """SKU -> name, unit price, stock; one SKU per (item, finish)."""
    rng = random.Random(f"catalog:{seed}")
    out = {}
    for i, item in enumerate(_ITEMS):
        for j, finish in enumerate(_FINISHES):
            out[f"{item[:3].upper()}-{100 + 10 * i + j}"] = {
                "name": f"{finish} {item}", "price": round(rng.randint(5, 400) / 20, 2), "stock": rng.randint(0, 60)}
    return out
