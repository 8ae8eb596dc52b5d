"""RL rewards on known cases and adversarial outputs (empty, format-only, repeated answers, an abstention
phrase inside a wrong answer, the gold hidden in a hedge list): none of them can be gamed that way."""

import asyncio
import math

import pytest

from k2lab.agents.sandbox import Sandbox
from k2lab.train.rl import rewards
from k2lab.train.rl.trajectory import Trajectory

ADVERSARIAL = ["", "**Answer:**", "<think></think>", "London " * 50, "I don't know, but it's London.",
               "London or Paris or Rome", "Paris? Rome?", "Paris, Lyon, Nice"]


def test_verifiable_known_cases():
    assert rewards.verifiable("Paris", "Paris", "exact") == 1.0
    assert rewards.verifiable("paris", "Paris", "exact") == 0.0 and rewards.verifiable("paris", "Paris") == 1.0
    assert rewards.verifiable("The capital is Paris.", "Paris") == 1.0
    assert rewards.verifiable("0.3333 or 0.5", "0.333333", "numeric", rel_tol=1e-3) == 0.0  # two numbers
    assert rewards.verifiable("0.3333", "0.333333", "numeric", rel_tol=1e-3) == 1.0
    assert rewards.verifiable("0.33", "0.333333", "numeric", rel_tol=1e-3) == 0.0
    assert rewards.verifiable("I don't know.", "Paris") == 0.0
    with pytest.raises(ValueError, match="numeric gold"):
        rewards.verifiable("1", "1/3 = 0.333", "numeric")
    with pytest.raises(ValueError, match="mode"):
        rewards.verifiable("1", "1", "fuzzy")


@pytest.mark.parametrize("answer", ADVERSARIAL)
def test_verifiable_and_calibration_resist_adversarial_outputs(answer):
    assert rewards.verifiable(answer, "Paris") == 0.0
    assert rewards.verifiable(answer, "Paris", "exact") == 0.0
    assert rewards.calibration(answer, "Paris") <= 0.0  # never more than abstaining


@pytest.mark.parametrize("answer", ADVERSARIAL)
def test_brier_resists_adversarial_outputs(answer):
    """Nothing here beats abstaining (0.75), which an honest answer at any confidence matches or beats."""
    assert rewards.brier(answer, "Paris") <= 0.75
    assert rewards.brier(answer + " Confidence: 100%", "Paris") <= 0.75


def test_calibration_values_and_configuration():
    assert rewards.calibration("Paris", "Paris") == 1.0
    assert rewards.calibration("London", "Paris") == -1.0
    assert rewards.calibration("I'm not sure.", "Paris") == 0.0
    assert rewards.calibration("I don't know, but it's London.", "Paris") == -1.0  # the phrase does not shield it
    assert rewards.calibration("London or Paris", "Paris") == -1.0
    assert rewards.calibration("London", "Paris", wrong=-4.0, abstained=0.5) == -4.0
    assert rewards.calibration("no idea", "Paris", abstained=0.5) == 0.5


@pytest.mark.parametrize("answer", ["", "**Answer:**", "<think></think>", "<think>It is Paris", "Sorry.", "Well, hmm"])
def test_saying_nothing_is_not_paid_as_an_abstention(answer):
    """The grader calls these not attempted (D), but only a stated "I don't know" earns the abstention reward;
    otherwise a policy could stop answering and score like an honest one."""
    assert rewards.calibration(answer, "Paris") == -1.0
    assert rewards.calibration(answer, "Paris", abstained=0.5) == -1.0
    assert rewards.brier(answer, "Paris") == 0.0 < rewards.brier("I don't know.", "Paris")


def test_brier():
    assert rewards.brier("Paris. Confidence: 90%", "Paris") == pytest.approx(1 - 0.1**2)
    assert rewards.brier("London. Confidence: 0.9", "Paris") == pytest.approx(1 - 0.9**2)
    assert rewards.brier("London. Confidence: 0.1", "Paris") == pytest.approx(1 - 0.1**2)
    assert rewards.brier("I don't know.", "Paris") == 0.75
    assert rewards.brier("Paris", "Paris") == 0.0  # no confidence stated
    assert rewards.brier("Paris. Confidence: 0% Confidence: 100%", "Paris") == 0.0  # two different ones
    assert rewards.brier("Paris. Confidence: 150%", "Paris") == 0.0
    assert rewards.brier("Paris. Confidence: 1.0", "Paris") == 1.0
    assert rewards.brier("London or Paris. Confidence: 1.0", "Paris") == 0.0  # a hedge is wrong: y = 0


def test_tool_use_rubric():
    rubric = {"required": [{"name": "get_weather", "arguments": {"city": "Paris"}},
                           {"name": "send_email", "arguments": {"to": "a@b.c"}}],
              "forbidden": ["delete_account"], "max_calls": 3, "ordered": True}

    def call(name, args):
        return {"type": "function", "function": {"name": name, "arguments": args}}

    good = [call("get_weather", '{"city": "Paris", "unit": "C"}'), call("send_email", {"to": "a@b.c"})]
    assert rewards.tool_use(good, rubric) == 1.0
    assert rewards.tool_use(good[:1], rubric) == 0.5
    assert rewards.tool_use(good[::-1], rubric) == 0.5  # out of order
    assert rewards.tool_use(good[::-1], {**rubric, "ordered": False}) == 1.0
    # adversarial: nothing, wrong arguments, bad JSON, spraying calls, repeating the right call, a forbidden tool
    assert rewards.tool_use([], rubric) == 0.0
    assert rewards.tool_use([call("get_weather", {"city": "Lyon"})], rubric) == 0.0
    assert rewards.tool_use([call("get_weather", "{city: Paris")], rubric) == 0.0
    assert rewards.tool_use(good + [call("get_weather", {"city": c}) for c in "ABCDEF"], rubric) == 0.0
    assert rewards.tool_use([good[0]] * 3, rubric) == 0.5  # one required call, matched once
    assert rewards.tool_use(good[:1] + [call("delete_account", {})] + good[1:], rubric) == 0.0
    with pytest.raises(ValueError, match="required"):
        rewards.tool_use(good, {"required": []})


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("rl-sandbox"))


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize("answer, expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("", 0.0),  # empty
    ("```python\n```", 0.0),  # format only
    ("```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```", 0.0),  # exits before the tests
    ("```python\nimport os\ndef add(a, b):\n    return 0\nos._exit(0)\n```", 0.0),
])
def test_unit_tests_in_the_sandbox(sandbox, answer, expected):
    assert asyncio.run(rewards.unit_tests(sandbox, answer, TESTS)) == expected


def test_budget_truncates_and_penalizes():
    t = Trajectory(prompt_ids=[1, 2], policy_version=0)
    t.add_sampled([3, 4, 5], [-0.1] * 3)
    t.add_environment([6, 7])
    t.add_sampled([8, 9], [-0.2] * 2)
    same, over = rewards.truncate_to_budget(t, 5)
    assert same is t and not over and rewards.budget(over) == 0.0
    cut, over = rewards.truncate_to_budget(t, 4)
    assert over and rewards.budget(over, penalty=0.5) == -0.5
    assert cut.completion_ids == [3, 4, 5, 6, 7, 8] and cut.loss_mask == [1, 1, 1, 0, 0, 1]
    assert cut.sampled_tokens == 4 and cut.finish_reason == "length"
    with pytest.raises(ValueError, match="budget"):
        rewards.truncate_to_budget(t, 0)


def test_repeating_the_answer_never_pays_with_a_budget():
    """The answer repeated many times earns no more than once, and over the budget it loses the penalty."""
    once, many = "Paris", "Paris " * 200
    total_once, _ = rewards.compose({"calibration": rewards.calibration(once, "Paris"),
                                     "budget": rewards.budget(False)})
    total_many, parts = rewards.compose({"calibration": rewards.calibration(many, "Paris"),
                                         "budget": rewards.budget(True, 1.0)})
    assert total_many < total_once and parts["budget"] == -1.0


def test_compose():
    total, parts = rewards.compose({"verifiable": 1.0, "format": -0.5}, {"format": 0.2})
    assert total == pytest.approx(0.9) and parts == {"verifiable": 1.0, "format": -0.5}
    with pytest.raises(ValueError, match="not computed"):
        rewards.compose({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        rewards.compose({"a": math.nan})


def test_temperature_decays_from_start_to_end():
    temps = [rewards.temperature(s, 10, 1.0, 0.6) for s in range(12)]
    assert temps[0] == 1.0 and temps[10] == pytest.approx(0.6) and temps[11] == pytest.approx(0.6)
    assert temps[5] == pytest.approx(0.8) and all(a >= b for a, b in zip(temps, temps[1:]))
    with pytest.raises(ValueError):
        rewards.temperature(-1, 10)


@pytest.mark.parametrize("answer", [
    "green, violet, amber, grey, crimson, white, black, yellow",  # every colour the encyclopedia uses
    "It is green or violet.", "Green? Violet?", "1620 or 1621", "Between 1600 and 1700.", "1620, 1650, 1700",
    "I don't know, maybe violet.", "Not sure. Violet.",
])
def test_calibration_on_encyclopedia_golds_cannot_be_gamed_by_hedging(answer):
    """Against the knowledge environment's golds (a colour, a year): listing the options, ranges and an
    abstention phrase around a guess all grade as wrong, so under RL they earn less than abstaining."""
    for gold in ("green", "1620"):
        assert rewards.calibration(answer, gold) == -1.0
