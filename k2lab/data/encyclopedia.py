"""A synthetic encyclopedia of invented entities, deterministic from a seed, for calibration.

Every entity (a town, a person or a mineral) and every fact about it is made up, so no model can know it from
anywhere but this module. Entities are split into "seen" ones, whose facts go into the pre-training corpus
(`corpus_text`), and "unseen" ones, which appear nowhere in training text: questions about them (`questions`)
have no answer a model could have learned, and the right reply is an abstention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th")
_PRODUCTS = ("copper bells", "blue glass", "salt cheese", "woven rope", "clay flutes", "pine resin", "iron nails",
             "dyed wool", "river pearls", "smoked fish", "paper lanterns", "stone mills")
_PROFESSIONS = ("astronomer", "cartographer", "composer", "botanist", "engineer", "poet", "physician", "architect")
_WORKS = ("Atlas", "Treatise", "Songbook", "Almanac", "Codex", "Survey", "Chronicle", "Herbal")
_COLORS = ("green", "violet", "amber", "grey", "crimson", "white", "black", "yellow")


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # "town", "person" or "mineral"
    facts: dict  # attribute -> value (str or int)
    seen: bool


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def encyclopedia(seed: int = 0, n: int = 240, seen_fraction: float = 0.5) -> list[Entity]:
    """`n` invented entities with unique names; every other one (by a seeded shuffle) is seen."""
    rng = random.Random(f"encyclopedia:{seed}")
    names: list[str] = []
    while len(names) < 2 * n:  # towns need names for their regions too
        w = _word(rng, rng.choice((2, 3)))
        if w not in names:
            names.append(w)
    order = list(range(n))
    rng.shuffle(order)
    seen_ids = set(order[: round(n * seen_fraction)])
    kinds = [("town", "person", "mineral")[i % 3] for i in range(n)]
    towns = {i: Entity(names[i], "town", {"region": names[n + i], "founded": rng.randint(900, 1899),
                                          "known_for": rng.choice(_PRODUCTS), "population": rng.randint(2, 400) * 250},
                       i in seen_ids) for i in range(n) if kinds[i] == "town"}
    out = []
    for i in range(n):
        if kinds[i] == "town":
            out.append(towns[i])
            continue
        # a seen entity links only to seen towns, so no unseen name ever reaches the corpus
        town = rng.choice([t.name for t in towns.values() if t.seen or i not in seen_ids])
        if kinds[i] == "person":
            facts = {"profession": rng.choice(_PROFESSIONS), "born": rng.randint(1400, 1949),
                     "home_town": town, "work": f"{rng.choice(_WORKS)} of {names[n + i]}"}
        else:
            facts = {"color": rng.choice(_COLORS), "hardness": rng.randint(1, 10),
                     "discovered": rng.randint(1600, 1999), "found_near": town}
        out.append(Entity(names[i], kinds[i], facts, i in seen_ids))
    return out


def describe(e: Entity) -> list[str]:
    """The entity's facts as encyclopedia sentences (each fact stated once)."""
    f = e.facts
    if e.kind == "town":
        return [f"{e.name} is a town in the {f['region']} region.", f"{e.name} was founded in {f['founded']}.",
                f"{e.name} is known for its {f['known_for']}.", f"{e.name} has a population of {f['population']}."]
    if e.kind == "person":
        return [f"{e.name} was a {f['profession']} born in {f['born']}.", f"{e.name} lived in the town of {f['home_town']}.",
                f"{e.name} wrote the {f['work']}."]
    return [f"{e.name} is a {f['color']} mineral.", f"{e.name} has a hardness of {f['hardness']}.",
            f"{e.name} was discovered in {f['discovered']}.", f"{e.name} is found near {f['found_near']}."]


def corpus_text(seed: int = 0, n: int = 240, repeats: int = 3) -> str:
    """Encyclopedia articles about the seen entities only, `repeats` shuffled passes (for pre-training)."""
    rng = random.Random(f"corpus:{seed}")
    seen = [e for e in encyclopedia(seed, n) if e.seen]
    passes = []
    for _ in range(repeats):
        rng.shuffle(seen)
        passes.extend(f"{e.name}\n\n" + " ".join(describe(e)) + "\n" for e in seen)
    return "\n".join(passes)


# (kind, attribute, question template, answer template)
_QUESTIONS = (
    ("town", "founded", "In what year was the town of {name} founded?", "{v}"),
    ("town", "known_for", "What is the town of {name} known for?", "{v}"),
    ("town", "region", "In which region is the town of {name}?", "the {v} region"),
    ("person", "born", "In what year was {name} born?", "{v}"),
    ("person", "profession", "What was {name}'s profession?", "{v}"),
    ("person", "home_town", "In which town did {name} live?", "{v}"),
    ("mineral", "color", "What color is the mineral {name}?", "{v}"),
    ("mineral", "discovered", "In what year was the mineral {name} discovered?", "{v}"),
    ("mineral", "found_near", "Near which town is the mineral {name} found?", "{v}"),
)


def questions(seed: int = 0, n: int = 240) -> list[dict]:
    """Calibration items: id, question, answer (the gold value), entity, seen; one per (entity, attribute)."""
    out = []
    for e in encyclopedia(seed, n):
        for kind, attr, q, a in _QUESTIONS:
            if kind == e.kind:
                out.append({"id": f"{e.name}:{attr}", "question": q.format(name=e.name),
                            "answer": a.format(v=e.facts[attr]), "gold": str(e.facts[attr]),
                            "entity": e.name, "seen": e.seen})
    return out
