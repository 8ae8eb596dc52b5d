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


# The rubric reward inside an environment's reward. The critic is the scripted server again (a test double: the
# thing under test is the wiring from episodes to reward components, not a critic model).

def test_critic_reward_is_added_to_each_groups_trajectories():
    from k2lab.train.rl.critic import add_critic_reward
    from k2lab.train.rl.trajectory import Trajectory

    answers = ["Great question! It is 4.", "4.", "Paris.", "Great question! Paris, I think."]
    trajs = [Trajectory(prompt_ids=[1], policy_version=0) for _ in answers]
    for t in trajs:
        t.set_reward({"rubric": 1.0}, 1.0)
    episodes = [{"prompt": p, "answer": a} for p, a in zip(["2 + 2?", "2 + 2?", "Capital?", "Capital?"], answers)]
    critic = Critic()

    async def go():
        async with LLM(base_url=srv.base_url, api_key="test", model="critic", max_retries=0) as llm:
            await add_critic_reward(llm, trajs, episodes, k=2, weight=0.5)
    with ScriptedServer(critic) as srv:
        asyncio.run(go())
    assert [t.rewards for t in trajs] == [{"rubric": 1.0, "critic": w} for w in (0.0, 1.0, 1.0, 0.0)]
    assert [t.reward for t in trajs] == [1.0, 1.5, 1.5, 1.0]
    assert sorted(critic.asked) == sorted([(answers[0], answers[1]), (answers[1], answers[0]),
                                           (answers[2], answers[3]), (answers[3], answers[2])])  # within groups


def test_rl_with_a_critic_url_adds_the_rubric_reward_component(tmp_path):
    """One `k2lab rl` step with --critic-url: every group is judged and 'critic' joins the reward components."""
    from k2lab.checkpoint import save_model
    from k2lab.runs import read_jsonl
    from k2lab.tokenizer import train_tokenizer
    from k2lab.train.rl.run import rl
    from k2lab.train.settings import RLSettings
    from tests.conftest import random_model, tiny_config

    tok = train_tokenizer(640, out_dir=tmp_path / "policy", max_bytes=100_000)
    config = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    save_model(random_model(config, seed=0), tmp_path / "policy")
    prompts = []

    def critic(req):
        prompts.append(re.search(r"Prompt:\n(.*)\n\nResponse A:", req.user, re.S).group(1))
        a = re.search(r"Response A:\n(.*)\n\nResponse B:", req.user, re.S).group(1)
        b = re.search(r"Response B:\n(.*)\n\nReply with", req.user, re.S).group(1)
        return {"content": "TIE" if len(a) == len(b) else ("A" if len(a) < len(b) else "B")}
    with ScriptedServer(critic) as srv:
        rl(RLSettings(checkpoint=str(tmp_path / "policy"), run_dir=str(tmp_path / "run"), env="mental",
                      batch_size=4, samples=2, max_new_tokens=6, max_turns=1, max_steps=1, optimizer="adamw",
                      critic_url=srv.base_url, critic_model="critic", critic_weight=2.0))
    (m,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert m["reward_critic"] == 0.5  # win rates within a group average one half
    assert abs(m["reward"] - (m["reward_budget"] + m["reward_rubric"] + 2.0 * 0.5)) < 1e-9
    assert len(prompts) == 2 * 2 and all(p.startswith("What is ") for p in prompts)  # 2 groups, both orders
