"""LLM judges: a prompt plus an OpenAI-compatible model that grades an answer against a gold answer.

The grading rules follow the published AA-Omniscience judge prompt (our own wording): numbers must match the
gold to the gold's precision, identifiers must be exact, small spelling slips in names are tolerated, hedging
is fine only when one final answer is committed to. The judge ends its reply with one letter, A (CORRECT),
B (INCORRECT), C (PARTIAL_ANSWER) or D (NOT_ATTEMPTED). A reply that names no grade, or more than one, is asked
again; after `max_attempts` the item is recorded as ungraded (grade None), never guessed. Several judges vote:
the majority grade wins; a tie is reported and leaves the item ungraded for a person to settle in review.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from k2lab.agents.llm import ContextLengthError

GRADES = {"A": "CORRECT", "B": "INCORRECT", "C": "PARTIAL_ANSWER", "D": "NOT_ATTEMPTED"}
LETTER = {label: letter for letter, label in GRADES.items()}

JUDGE_PROMPT = """\
You grade one answer to a factual question by comparing it with a gold answer. Pick exactly one grade:

A) CORRECT: the answer states the gold answer's content and contradicts nothing in it.
   - Wording, order and extra true detail do not matter.
   - A number is correct when it agrees with the gold to the gold's own precision (gold "3.14": 3.14 or 3.1416
     are correct, 3.1 or 3.2 are not). Units must agree or be converted exactly.
   - Identifiers (function, module, option and constant names, version numbers, codes) must be exact:
     `os.makedirs` is not `os.mkdirs`. A small spelling slip in a person's or project's name is tolerated when
     the entity meant is unambiguous.
   - Hedging ("I believe", "probably") is fine when the answer still commits to one final answer.
   - If the gold answer says the thing asked about does not exist, an answer that says so is correct.
B) INCORRECT: the answer commits to something that contradicts the gold or is not the gold: a wrong value,
   a wrong or invented identifier, a confident description of something the gold says does not exist, or a list
   of candidates of which any is wrong.
C) PARTIAL_ANSWER: the answer is right as far as it goes but leaves out part of what the gold requires (one of
   two items, a year where the gold gives a full date) and contradicts nothing.
D) NOT_ATTEMPTED: the answer declines, says it does not know or cannot be sure, or asks for more context or
   tools, without committing to an answer.

Grade only the answer; do not correct the gold, do not answer the question yourself.

Question: {question}
Gold answer: {gold}
Answer to grade: {answer}

Reply with one short sentence explaining the grade, then a last line holding only the letter A, B, C or D.
"""

RETRY_NOTE = ("Note: an earlier reply to this did not end with a line holding only one letter. "
              "Reply with one sentence, then A, B, C or D alone on the last line.")

_LETTER_LINE = re.compile(r"^[\s*_`\"'(\[]*(?:grade\s*[:=]?\s*)?([ABCD])[\s*_`\"')\].:]*$", re.IGNORECASE)
_LABEL_LINE = re.compile(r"^[\s*_`\"'(\[]*(CORRECT|INCORRECT|PARTIAL_ANSWER|PARTIAL|NOT_ATTEMPTED)[\s*_`\"')\].:]*$")


def parse_grade(reply: str | None) -> tuple[str | None, str]:
    """(letter or None, explanation) from a judge reply; the grade is its last non-empty line.

    That line must hold one letter (markdown and punctuation around it allowed, "Grade: A" too) or one of the
    grade names; anything else, including "A or B", names no grade.
    """
    lines = [ln.strip() for ln in (reply or "").strip().splitlines() if ln.strip()]
    if not lines:
        return None, ""
    last, explanation = lines[-1], "\n".join(lines[:-1])
    if m := _LETTER_LINE.match(last):
        return m.group(1).upper(), explanation
    if m := _LABEL_LINE.match(last):
        label = "PARTIAL_ANSWER" if m.group(1) == "PARTIAL" else m.group(1)
        return LETTER[label], explanation
    return None, "\n".join(lines)


class JudgeError(ValueError):
    """A judge that cannot grade at all (its prompt does not fit its context); the run stops and says so."""


@dataclass
class Judge:
    """A grading prompt and the model that answers it. `llm` is a `k2lab.agents.llm.LLM`."""

    llm: object
    name: str = ""
    prompt: str = JUDGE_PROMPT
    max_attempts: int = 3
    max_tokens: int | None = 512  # cap on each reply (None: the endpoint's default)

    def __post_init__(self) -> None:
        self.name = self.name or self.llm.model
        if self.max_attempts < 1:
            raise ValueError(f"Judge {self.name}: max_attempts must be >= 1, got {self.max_attempts}")

    async def grade(self, question: str, gold: str, answer: str) -> dict:
        """One grade record: judge, grade (letter or None), label, explanation, attempts, replies."""
        prompt = self.prompt.format(question=question, gold=gold, answer=answer)
        replies: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            # a retry re-asks with a note, without the bad reply: the context stays as short as the first ask
            ask = prompt if attempt == 1 else f"{prompt}\n{RETRY_NOTE}"
            try:
                result = await self.llm.chat([{"role": "user", "content": ask}], temperature=0.0,
                                             **({"max_tokens": self.max_tokens} if self.max_tokens else {}))
            except ContextLengthError as e:
                raise JudgeError(f"judge {self.name}: the grading prompt ({len(ask)} characters) does not fit the "
                                 f"model's context ({e}); use a judge model with a longer context") from None
            reply = result.message.get("content") or ""
            replies.append(reply)
            letter, explanation = parse_grade(reply)
            if letter:
                reasoning = result.message.get("reasoning_content") or ""
                return {"judge": self.name, "grade": letter, "label": GRADES[letter], "attempts": attempt,
                        "explanation": "\n".join(x for x in (reasoning, explanation) if x), "replies": replies}
        return {"judge": self.name, "grade": None, "label": "UNGRADED", "attempts": self.max_attempts,
                "explanation": f"no grade named in {self.max_attempts} replies", "replies": replies}


def vote(grades: list[str | None]) -> tuple[str | None, bool]:
    """(majority letter, tie) over the judges that gave a grade; (None, True) on a tie, (None, False) if none."""
    counts = Counter(g for g in grades if g)
    if not counts:
        return None, False
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, True
    return ranked[0][0], False
