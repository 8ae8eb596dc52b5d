"""The self-critique rubric reward, with the scripted OpenAI-compatible server playing the critic (a test
double: a script, not a model). It checks the harness: prompts carry the rubrics and both responses, every
pair is asked in both orders, unparseable verdicts are retried then count as ties, win rates are exact."""

import asyncio
import re

import pytest

from k2lab.agents.llm import LLM
from k2lab.testing.scripted_server import ScriptedServer
from k2lab.train.rl.critic import CORE_RUBRICS, PRESCRIPTIVE_RUBRICS, parse_verdict, rubric_rewards

RESPONSES = ["Great question! The answer is 4, and this answer is excellent.", "4.", "2 + 2 = 4."]


class Critic:
    """Prefers the response without praise, then the shorter; counts what it was asked."""

    def __init__(self, garble: int = 0):
        self.asked: list[tuple[str, str]] = []
        self.garble = garble

    def __call__(self, req) -> dict:
        text = req.user
        assert all(r in text for r in CORE_RUBRICS + PRESCRIPTIVE_RUBRICS)
        a = re.search(r"Response A:\n(.*)\n\nResponse B:", text, re.S).group(1)
        b = re.search(r"Response B:\n(.*)\n\nReply with", text, re.S).group(1)
        self.asked.append((a, b))
        if len(self.asked) <= self.garble:
            return {"content": "Both have merit."}  # no verdict line
        key = {x: ("Great" in x, len(x)) for x in (a, b)}
        verdict = "TIE" if key[a] == key[b] else ("A" if key[a] < key[b] else "B")
        return {"content": f"Judged on the rubrics.\n{verdict}"}


def run(critic: Critic, responses: list[str]) -> list[float]:
    async def go():
        async with LLM(base_url=srv.base_url, api_key="test", model="critic", max_retries=0) as llm:
            return await rubric_rewards(llm, "What is 2 + 2?", responses)
    with ScriptedServer(critic) as srv:
        return asyncio.run(go())


def test_win_rates_over_both_orders():
    critic = Critic()
    scores = run(critic, RESPONSES)
    # "4." beats both; "2 + 2 = 4." beats the praising one; the praising one loses every comparison
    assert scores == pytest.approx([0.0, 1.0, 0.5])
    assert sorted(critic.asked) == sorted((RESPONSES[i], RESPONSES[j]) for i in range(3) for j in range(3) if i != j)


def test_ties_and_unparseable_verdicts():
    assert run(Critic(), ["same", "same"]) == [0.5, 0.5]
    critic = Critic(garble=1)  # the first reply names no verdict and is asked again
    assert run(critic, ["4.", "Great question! 4."]) == pytest.approx([1.0, 0.0])
    assert len(critic.asked) == 3
    assert parse_verdict("reasoning\n**B**") == "B" and parse_verdict("A or B") is None and parse_verdict("") is None
    with pytest.raises(ValueError, match="at least 2"):
        asyncio.run(rubric_rewards(None, "p", ["only one"]))
