"""A deterministic grader for closed-form answers: normalized match, numbers to the gold's precision, and
abstention detection. It runs offline and gives the same grade every time; the LLM judge (judge.py) stays the
default for free-form answers, and `compare_graders` measures how far the two agree on the same items.

Grades are the judge's letters: A (correct), B (incorrect), D (not attempted); never C (partial).
- Abstention: clauses that decline ("I don't know", "not sure", "would need more context", ...) are dropped;
  when nothing but filler is left the answer is D. An abstention phrase next to a committed answer ("I don't
  know, but it's Paris") does not shield it: what is left is graded.
- A gold that says the thing asked about does not exist is matched by an answer that says so (without "or").
- A numeric gold matches when every number in the answer agrees with it to the gold's own precision (half a
  unit of its last digit) or within `rel_tol`; an answer with two different numbers is a hedge, hence B.
- A text gold matches when its normalized words appear in the answer, the rest of the answer offers no
  alternative ("or", "either", a list of three or more items) and holds at most `max_extra_words` other words.
"""

from __future__ import annotations

import math
import re
import unicodedata

from k2lab.evals.judge import GRADES
from k2lab.evals.stats import cohen_kappa, confusion_matrix

ABSTAIN = [r"\bi (?:do not|don'?t|really don'?t) know\b", r"\bnot (?:sure|certain|confident)\b", r"\bunsure\b",
           r"\bno idea\b", r"\b(?:cannot|can'?t|can not|could not|couldn'?t) (?:be sure|be certain|answer|say|tell|"
           r"determine|recall|verify|confirm)\b", r"\bunable to (?:answer|determine|verify|recall|say|confirm)\b",
           r"\b(?:need|require) (?:more|additional|further) (?:context|information|details|tools)\b",
           r"\b(?:don'?t|do not) have (?:enough |reliable |that |this |the )?(?:information|data|knowledge)\b",
           r"\bno (?:reliable |verified )?information\b", r"\b(?:don'?t|do not) (?:recall|remember)\b",
           r"\bi'?m not aware\b|\bi am not aware\b", r"\bdecline to\b"]
NONEXISTENT = [r"\b(?:does not|doesn'?t|did not|didn'?t|do not|don'?t|never) exist(?:s|ed)?\b", r"\bno such\b",
               r"\bthere (?:is|are|was) no\b", r"\bnot (?:a real|an actual|a genuine|part of)\b",
               r"\bnon-?existent\b", r"\b(?:is not|isn'?t|are not|aren'?t) real\b"]
FILLER = set("""sorry unfortunately however but so honestly really i i'm im am it it's its is that this the a an to
answer question my here and well okay ok oh hmm please note""".split())
ALTERNATIVE = {"or", "either", "nor"}
_ABSTAIN = re.compile("|".join(ABSTAIN))
_NONEXISTENT = re.compile("|".join(NONEXISTENT))
_SEPARATORS = r"[!?;\n()|/]+|\.(?=\s|$)|,(?!\d)"  # a '.' or ',' inside an identifier or number is no separator
_CHUNKS = re.compile(_SEPARATORS)
_CLAUSES = re.compile(_SEPARATORS + r"|\bbut\b|\bhowever\b|\balthough\b")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")
_WORD = re.compile(r"[\w'+-]+(?:\.[\w'+-]+)*")


def _plain(text: str | None) -> str:
    """NFKC, case-folded, curly quotes straightened; reasoning (a think block, or an unclosed one to the end),
    markdown emphasis and code fences removed."""
    text = unicodedata.normalize("NFKC", text or "").casefold().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"<think>.*?(?:</think>|$)", " ", text, flags=re.DOTALL)
    return re.sub(r"```\w*|[*_`#>]+(?=\W|$)|(?<=\W)[*_`#>]+|^[*_`#>]+", " ", text)


def words(text: str | None) -> list[str]:
    """Normalized words: identifiers keep their dots (`os.makedirs`), articles are dropped."""
    return [w.strip("'.-") for w in _WORD.findall(_plain(text)) if w.strip("'.-") not in ("a", "an", "the", "")]


def committed(text: str | None) -> str:
    """The answer with every declining clause removed; '' when it commits to nothing (an abstention)."""
    kept = [c for c in _CLAUSES.split(_plain(text)) if c.strip() and not _ABSTAIN.search(c)]
    rest = "\n".join(kept)  # keep the clause boundaries: `match` reads lists from them
    return rest if [w for w in words(rest) if w not in FILLER] else ""


def abstains(text: str | None) -> bool:
    return committed(text) == ""


def declines(text: str | None) -> bool:
    """Whether the answer says it does not know (an abstention phrase), as opposed to saying nothing: both
    grade D, but only a stated abstention is the behaviour a calibration reward pays for."""
    return bool(_ABSTAIN.search(_plain(text)))


def asserts_nonexistence(text: str | None) -> bool:
    return bool(_NONEXISTENT.search(_plain(text)))


def numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(_plain(text))]


def as_number(gold: str) -> tuple[float, float] | None:
    """(value, half a unit of the last written digit) when the gold is one number, else None."""
    found = _NUMBER.findall(gold.strip())
    if len(found) != 1 or words(gold) != words(found[0]):
        return None
    mantissa, _, exp = found[0].replace(",", "").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return float(found[0].replace(",", "")), 0.5 * 10.0 ** (int(exp or 0) - decimals)


def _contains(seq: list[str], sub: list[str]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def _bare_list(answer: str, gold: list[str]) -> bool:
    """Whether the answer is a list of bare candidates ("Paris, London", "Paris? Rome?"): the chunk holding the
    gold is little more than the gold and another chunk is a short run of content words with no filler."""
    chunks = [words(c) for c in _CHUNKS.split(_plain(answer))]
    chunks = [c for c in chunks if c]
    with_gold = [c for c in chunks if _contains(c, gold)]
    bare_other = [c for c in chunks if not _contains(c, gold) and len(c) <= 3 and not FILLER & set(c)]
    return bool(bare_other) and any(len(c) <= len(gold) + 1 for c in with_gold)


def match(answer: str, gold: str, rel_tol: float = 0.0, max_extra_words: int = 6) -> bool:
    """Whether a committed answer states the gold (see the module docstring for the rules)."""
    if asserts_nonexistence(gold):
        return asserts_nonexistence(answer) and not ALTERNATIVE & set(words(answer))
    num = as_number(gold)
    if num is not None:
        value, half_unit = num
        found = numbers(answer)
        return bool(found) and all(abs(x - value) <= max(half_unit, rel_tol * abs(value)) * (1 + 1e-9)
                                   for x in found)
    a, g = words(answer), words(gold)
    if not g:
        return False
    if a == g:
        return True
    hits = _contains(a, g)
    if not hits:
        return False
    rest, i = [], 0
    for h in hits:  # drop every occurrence of the gold, keep what surrounds it
        if h >= i:
            rest += a[i:h]
            i = h + len(g)
    rest += a[i:]
    if ALTERNATIVE & set(rest) or _bare_list(answer, g):
        return False
    return len([w for w in rest if w not in FILLER]) <= max_extra_words


def grade(answer: str | None, gold: str, rel_tol: float = 0.0) -> str:
    """A (correct), B (incorrect) or D (not attempted) for one answer."""
    text = committed(answer)
    if not text:
        return "D"
    return "A" if match(text, gold, rel_tol) else "B"


class RulesJudge:
    """The deterministic grader behind the judge interface that `run_calibration` uses."""

    name = "rules"

    async def grade(self, question: str, gold: str, answer: str) -> dict:
        letter = grade(answer, gold)
        return {"judge": self.name, "grade": letter, "label": GRADES[letter], "attempts": 1,
                "explanation": "deterministic rules (k2lab.evals.rules)", "replies": []}


def compare_graders(items: list[dict]) -> dict:
    """The rules grade against the judges' vote on the same items (from `calibration.load_items`): agreement,
    Cohen's kappa, the confusion matrix (judge rows, rules columns, letters A-D) and the disagreements."""
    pairs = [(i, i["judge_grade"], grade(i["answer"], i["gold"])) for i in items if i.get("judge_grade")]
    if not pairs:
        raise ValueError("compare_graders: no item has a judge grade; run the calibration eval with judges first")
    judge, rules = [p[1] for p in pairs], [p[2] for p in pairs]
    kappa = cohen_kappa(judge, rules)
    return {"items": len(pairs), "agreement": sum(j == r for j, r in zip(judge, rules)) / len(pairs),
            "cohen_kappa": None if math.isnan(kappa) else kappa, "labels": list(GRADES),
            "confusion_judge_rows_rules_cols": confusion_matrix(judge, rules, list(GRADES)),
            "disagreements": [{"id": i["id"], "question": i["question"], "gold": i["gold"], "answer": i["answer"],
                               "judge": j, "rules": r} for i, j, r in pairs if j != r]}
