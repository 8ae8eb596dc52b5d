"""A synthetic encyclopedia of invented entities, deterministic from a seed, for calibration.

Every entity (a town, a person or a mineral) and every fact about it is made up, so no model can know it from
anywhere but this module. Entities are split into "seen" ones, whose facts go into the pre-training corpus
(`corpus_text`), and "unseen" ones, which appear nowhere in training text: questions about them (`questions`)
have no answer a model could have learned, and the right reply is an abstention.

Entities are also split for post-training (`heldout_entities`): a third of them, seen and unseen alike, are held out for
evaluation (`heldout_calibration_set`); SFT and RL draw their questions from the rest ("train"). A held-out
question about a seen entity asks for a fact the model read in pre-training but was never asked about; one about
an unseen entity names a name it never met anywhere.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

# what the calibration eval's answer prompt says the questions are about (the knowledge domain's system prompt
# is the same prompt, so training and evaluation ask alike)
DOMAIN, TOPIC = "an encyclopedia", "its towns, people and minerals"
EVAL_SHARE = 1 / 3  # of the entities, held out from SFT and RL

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


def encyclopedia(seed: int = 0, n: int = 90, seen_fraction: float = 0.5) -> list[Entity]:
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


# each fact's sentence templates: the first is the canonical one; pre-training text draws among them, since a
# fact stated in several wordings is one a small model can later retrieve for a question (knowledge augmentation)
_SENTENCES = {
    "town": [("{n} is a town in the {region} region.", "The town of {n} lies in the {region} region."),
             ("{n} was founded in {founded}.", "The town of {n} was founded in the year {founded}."),
             ("{n} is known for its {known_for}.", "The town of {n} is famous for its {known_for}."),
             ("{n} has a population of {population}.", "About {population} people live in {n}.")],
    "person": [("{n} was a {profession} born in {born}.", "{n}, a {profession}, was born in {born}."),
               ("{n} lived in the town of {home_town}.", "{n} made a home in the town of {home_town}."),
               ("{n} wrote the {work}.", "The {work} was written by {n}.")],
    "mineral": [("{n} is a {color} mineral.", "The mineral {n} is {color} in color."),
                ("{n} has a hardness of {hardness}.", "The hardness of {n} is {hardness}."),
                ("{n} was discovered in {discovered}.", "The mineral {n} was first discovered in {discovered}."),
                ("{n} is found near {found_near}.", "The mineral {n} is found near the town of {found_near}.")],
}


def describe(e: Entity, rng: random.Random | None = None) -> list[str]:
    """The entity's facts as encyclopedia sentences (each fact stated once): canonical wording in canonical
    order, or with `rng` a drawn wording per fact in a shuffled order."""
    out = [(rng.choice(forms) if rng else forms[0]).format(n=e.name, **e.facts) for forms in _SENTENCES[e.kind]]
    if rng:
        rng.shuffle(out)
    return out


def answer_sentence(answer: str) -> str:
    """An answer as the knowledge domain's solver writes it (and SFT teaches): "The Sarn family founded it."."""
    return f"{answer[0].upper()}{answer[1:]}."


QA_FORMATS = ("text", "chat")  # how pre-training's mixed-in questions are written (k2lab.train.data.encyclopedia_rows)
QA_ENTITIES = ("all", "half")  # whose questions pre-training mixes in: every post-training entity's, or half


def qa_half(name: str) -> bool:
    """The half of the entities whose questions `corpus_documents(qa_entities="half")` mixes in: a fixed choice by
    name (the first byte of its SHA-256 is even), the same in every run."""
    return hashlib.sha256(name.encode()).digest()[0] % 2 == 0


def qa_text(pairs: list[tuple[str, str]]) -> str:
    """An article's questions answered in plain text ("Q: ... / A: ..."), as `corpus_documents(qa=True)`
    appends them by default."""
    return "".join(f"\nQ: {q}\nA: {a}." for q, a in pairs) + "\n"


def corpus_documents(seed: int = 0, n: int = 90, passes: int = 3, qa: bool = False,
                     qa_render: Callable[[list[tuple[str, str]]], str] = qa_text,
                     qa_entities: str = "all") -> list[str]:
    """Articles about the seen entities only, `passes` shuffled passes, each article freshly worded.

    qa: the articles of entities that post-training asks about (the "train" split) end with those questions and
    their answers, in a shuffled order, written by `qa_render([(question, answer), ...])` (by default
    "Q: ... / A: ..."); a held-out entity's article never does. This is mixed training (Allen-Zhu and Li,
    Physics of Language Models 3.1): a model that read questions answered from some articles learns to answer
    them from the others, where one that read articles only recites them. qa_entities="half": only the entities
    `qa_half` picks get their questions; post-training then also asks about seen entities whose facts the model
    read but was never asked about, as the held-out set does, so calibration RL meets facts it fails to retrieve."""
    if qa_entities not in QA_ENTITIES:
        raise ValueError(f"unknown qa_entities {qa_entities!r}; choose {' or '.join(QA_ENTITIES)}")
    rng = random.Random(f"corpus:{seed}")
    seen = [e for e in encyclopedia(seed, n) if e.seen]
    asked: dict[str, list[tuple[str, str]]] = {}
    if qa:
        for q in questions(seed, n):
            if q["seen"] and q["split"] == "train" and (qa_entities == "all" or qa_half(q["entity"])):
                asked.setdefault(q["entity"], []).append((q["question"], q["answer"]))
    docs = []
    for _ in range(passes):
        rng.shuffle(seen)
        for e in seen:
            pairs = list(asked.get(e.name, ()))
            rng.shuffle(pairs)
            docs.append(f"{e.name}\n\n" + " ".join(describe(e, rng)) + "\n" + (qa_render(pairs) if pairs else ""))
    return docs


def corpus_text(seed: int = 0, n: int = 90, repeats: int = 3) -> str:
    """The seen entities' articles as one text (for pre-training)."""
    return "\n".join(corpus_documents(seed, n, repeats))


def heldout_entities(seed: int = 0, n: int = 90) -> set[str]:
    """The names held out from post-training: a seeded third of each (kind, seen) group."""
    rng = random.Random(f"split:{seed}")
    out: set[str] = set()
    for kind in ("town", "person", "mineral"):
        for seen in (True, False):
            names = [e.name for e in encyclopedia(seed, n) if e.kind == kind and e.seen == seen]
            rng.shuffle(names)
            out.update(names[: round(len(names) * EVAL_SHARE)])
    return out


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


def questions(seed: int = 0, n: int = 90) -> list[dict]:
    """Calibration items: id, question, answer, gold (the bare value), entity, seen, split; one per (entity,
    attribute)."""
    out, held_out = [], heldout_entities(seed, n)
    for e in encyclopedia(seed, n):
        for kind, attr, q, a in _QUESTIONS:
            if kind == e.kind:
                out.append({"id": f"{e.name}:{attr}", "question": q.format(name=e.name),
                            "answer": a.format(v=e.facts[attr]), "gold": str(e.facts[attr]),
                            "entity": e.name, "seen": e.seen, "split": "eval" if e.name in held_out else "train"})
    return out


def cloze_items(seed: int = 0, n: int = 90) -> list[dict]:
    """Every asked fact as a pre-training-style cloze: the fact's canonical sentence cut just before the value
    ("Broubeth is a" for its colour), with id, gold and seen. A base model's greedy continuation shows what
    pre-training stored; on unseen entities the same prompts give the chance level."""
    ents = {e.name: e for e in encyclopedia(seed, n)}
    out = []
    for q in questions(seed, n):
        e = ents[q["entity"]]
        attr = q["id"].rpartition(":")[2]
        template = next(f[0] for f in _SENTENCES[e.kind] if "{" + attr + "}" in f[0])
        prefix = template.partition("{" + attr + "}")[0].rstrip()
        out.append({"id": q["id"], "prompt": prefix.format(n=e.name, **e.facts), "gold": q["gold"], "seen": q["seen"]})
    return out


def heldout_calibration_set(seed: int = 0, n: int = 90) -> list[dict]:
    """The held-out questions as rows of the calibration eval's dataset (`k2lab eval calibration --dataset`):
    id, domain, topic, question, answer (the bare gold value, which the rules grader matches), and kind "known"
    (a seen entity) or "unknown" (an unseen one), so its results are broken down by kind."""
    return [{"id": q["id"], "domain": DOMAIN, "topic": TOPIC, "question": q["question"], "answer": q["gold"],
             "kind": "known" if q["seen"] else "unknown"} for q in questions(seed, n) if q["split"] == "eval"]
