"""Episodes against the embedded environments: the trajectory's tokens are the rendered conversation, the loss
mask covers exactly what the policy generated, tools really run, and rewards grade the episode.

The policy here is a scripted generator (a fake model backend: the thing under test is the episode glue, not
the model) that writes given assistant messages as the K2.6 format renders them."""

import json

import pytest

from k2lab.serve.rollout import RolloutParams, RolloutSample
from k2lab.synth.domains import calculate, make_tasks, registry
from k2lab.tokenizer.chat import render, render_assistant
from k2lab.train.rl.episodes import run_episodes


class ScriptedGenerator:
    """Turn t of every sample writes script[t] (then <|im_end|>), with log-prob -0.5 per token; with thinking,
    as a model in K2.6 thinking mode writes it (reasoning, </think>, the answer)."""

    def __init__(self, tok, script, thinking=False):
        self.tok, self.script, self.turn, self.policy_version, self.thinking = tok, script, 0, 3, thinking

    def generate(self, prompts, k=1, params=RolloutParams()):
        text = render_assistant(self.script[self.turn], thinking=self.thinking) + "<|im_end|>"
        ids = self.tok.encode(text, allow_special=True)
        self.turn += 1
        return [RolloutSample(i // k, i % k, list(p), ids, [-0.5] * len(ids), "stop", self.policy_version)
                for i, p in enumerate(prompts) for _ in range(k)]


def _runs(mask):
    """(start, end) of the maximal runs of 1 in a 0/1 list."""
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def _expression_task():
    return next(t for t in make_tasks(["arithmetic"], 12, seed=1) if t.world["kind"] == "expression")


def test_multi_turn_trajectory_is_the_rendered_conversation_and_masks_the_environment(tok):
    task = _expression_task()
    expr = task.world["expression"]
    value = calculate(expr)["result"]
    script = [{"role": "assistant", "content": "", "tool_calls": [{"id": "functions.calculate:0", "type": "function",
               "function": {"name": "calculate", "arguments": json.dumps({"expression": expr})}}]},
              {"role": "assistant", "content": f"{expr} = {value}"}]
    trajs, grades = run_episodes(ScriptedGenerator(tok, script), tok, [task], k=2,
                                 params=RolloutParams(max_new_tokens=64), max_turns=4, context=4096,
                                 budget_penalty=0.5)
    assert len(trajs) == 2 and trajs[0].prompt_ids == trajs[1].prompt_ids
    tools = registry()["arithmetic"].tools
    conversation = [{"role": "system", "content": task.system}, {"role": "user", "content": task.turns[0]},
                    script[0],
                    {"role": "tool", "tool_call_id": "functions.calculate:0",
                     "content": json.dumps(calculate(expr), sort_keys=True)},
                    script[1]]
    for t, g in zip(trajs, grades):
        # the token stream decodes to exactly the K2.6 rendering of the whole conversation (tool really run)
        assert tok.decode(t.prompt_ids + t.completion_ids) == render(conversation, tools, thinking=False)
        # the prompt ends at the generation prompt; mask-1 runs are exactly the two generated assistant turns
        assert tok.decode(t.prompt_ids).endswith("<|im_assistant|>assistant<|im_middle|><think></think>")
        runs = [tok.decode(t.completion_ids[a:b]) for a, b in _runs(t.loss_mask)]
        assert runs == [render_assistant(m, thinking=False) + "<|im_end|>" for m in script]
        env_text = tok.decode([i for i, m in zip(t.completion_ids, t.loss_mask) if not m])
        assert env_text.startswith("<|im_system|>tool<|im_middle|>## Return of functions.calculate:0\n")
        assert env_text.endswith("<|im_assistant|>assistant<|im_middle|><think></think>")
        assert all(lp == (-0.5 if m else 0.0) for lp, m in zip(t.logprobs, t.loss_mask))
        assert t.rewards == {"budget": 0.0, "rubric": 1.0} and t.reward == 1.0 and t.policy_version == 3
        assert g == {"grade": "correct", "domain": "arithmetic", "prompt": task.turns[0], "answer": script[1]["content"]}


def _knowledge_task(seen: bool):
    return next(t for t in make_tasks(["knowledge"], 8, seed=0) if t.world["seen"] == seen)


@pytest.mark.parametrize("seen, answer, reward, grade, wrong", [
    (True, None, 1.0, "correct", -1.0),  # None: the gold answer
    (True, "I don't know.", 0.0, "abstained", -1.0),
    (False, "It was 1620.", -1.0, "wrong", -1.0),
    (False, "I don't know.", 0.0, "abstained", -1.0),
    (False, "It was 1620.", -0.5, "wrong", -0.5),  # --wrong-reward
    (True, None, 1.0, "correct", -0.5),
    (False, "", -0.5, "wrong", -0.5),  # silence is paid as wrong, whatever wrong pays
])
def test_knowledge_episode_gets_the_calibration_reward(tok, seen, answer, reward, grade, wrong):
    from k2lab.data.encyclopedia import questions

    task = _knowledge_task(seen)
    gold = {q["id"]: q["answer"] for q in questions()}[task.world["item_id"]]
    script = [{"role": "assistant", "content": answer if answer is not None else f"{gold[0].upper()}{gold[1:]}."}]
    trajs, grades = run_episodes(ScriptedGenerator(tok, script), tok, [task], k=2,
                                 params=RolloutParams(max_new_tokens=64), max_turns=2, context=4096,
                                 budget_penalty=0.5, wrong_reward=wrong)
    assert [t.rewards for t in trajs] == [{"budget": 0.0, "calibration": reward}] * 2
    assert [g["grade"] for g in grades] == [grade] * 2


def test_a_turn_over_budget_is_closed_by_the_environment_and_penalized(tok):
    class Cut(ScriptedGenerator):
        def generate(self, prompts, k=1, params=RolloutParams()):
            return [RolloutSample(i, j, list(p), [65, 66, 67], [-1.0] * 3, "length", 0)
                    for i, p in enumerate(prompts) for j in range(k)]

    task = _knowledge_task(True)
    trajs, _ = run_episodes(Cut(tok, []), tok, [task], k=2, params=RolloutParams(max_new_tokens=3), max_turns=2,
                            context=4096, budget_penalty=0.5)
    for t in trajs:
        assert t.completion_ids == [65, 66, 67, tok.special_tokens["<|im_end|>"]] and t.loss_mask == [1, 1, 1, 0]
        assert t.rewards == {"budget": -0.5, "calibration": -1.0} and t.reward == -1.5


def test_thinking_on_episode_trains_the_reasoning_and_rewards_only_the_answer(tok):
    """Thinking mode: the prompt opens <think>, the sampled reasoning is trained and kept in the context of the
    next turn (token in, token out: preserve_thinking's rendering), and the reward reads the answer alone."""
    task = _expression_task()
    expr = task.world["expression"]
    value = calculate(expr)["result"]
    call = {"id": "functions.calculate:0", "type": "function",
            "function": {"name": "calculate", "arguments": json.dumps({"expression": expr})}}
    script = [{"role": "assistant", "content": "", "reasoning_content": "I should use the calculator.",
               "tool_calls": [call]},
              {"role": "assistant", "content": f"{expr} = {value}", "reasoning_content": "The tool says so."}]
    trajs, grades = run_episodes(ScriptedGenerator(tok, script, thinking=True), tok, [task], k=1,
                                 params=RolloutParams(max_new_tokens=64), max_turns=4, context=4096,
                                 budget_penalty=0.5, thinking=True)
    (t,), (g,) = trajs, grades
    conversation = [{"role": "system", "content": task.system}, {"role": "user", "content": task.turns[0]},
                    script[0], {"role": "tool", "tool_call_id": "functions.calculate:0",
                                "content": json.dumps(calculate(expr), sort_keys=True)}, script[1]]
    tools = registry()["arithmetic"].tools
    assert tok.decode(t.prompt_ids + t.completion_ids) == render(conversation, tools, thinking=True,
                                                                  preserve_thinking=True)
    assert tok.decode(t.prompt_ids).endswith("<|im_assistant|>assistant<|im_middle|><think>")
    runs = [tok.decode(t.completion_ids[a:b]) for a, b in _runs(t.loss_mask)]
    assert runs == [render_assistant(m, thinking=True) + "<|im_end|>" for m in script]
    assert runs[0].startswith("I should use the calculator.</think>")  # the reasoning is sampled and trained
    assert t.rewards == {"budget": 0.0, "rubric": 1.0} and g["answer"] == script[1]["content"]

    # the answer is graded, not the reasoning: the right value only in the reasoning earns nothing
    wrong = [script[0], {"role": "assistant", "content": f"{expr} = {value + 1}",
                         "reasoning_content": f"It is {value}."}]
    (t,), _ = run_episodes(ScriptedGenerator(tok, wrong, thinking=True), tok, [task], k=1,
                           params=RolloutParams(max_new_tokens=64), max_turns=4, context=4096,
                           budget_penalty=0.5, thinking=True)
    assert t.rewards["rubric"] < 1.0


@pytest.mark.parametrize("seen, answer, reward, grade, confidence", [
    (True, "{gold}. Confidence: 0.9", 1 - 0.1 ** 2, "correct", 0.9),
    (True, "{gold}.", 0.0, "correct", None),  # no confidence stated: nothing earned
    (False, "It was 1620. Confidence: 80%", 1 - 0.8 ** 2, "wrong", 0.8),
    (False, "It was 1620. Confidence: 0.1", 1 - 0.1 ** 2, "wrong", 0.1),
    (False, "I don't know.", 0.75, "abstained", None),
    (True, "Confidence: 1.0", 0.0, "wrong", 1.0),  # format only: no answer
])
def test_knowledge_episode_with_the_brier_reward_asks_for_and_scores_a_confidence(tok, seen, answer, reward,
                                                                                    grade, confidence):
    from k2lab.data.encyclopedia import questions
    from k2lab.train.rl.rewards import CONFIDENCE_INSTRUCTION

    task = _knowledge_task(seen)
    gold = {q["id"]: q["answer"] for q in questions()}[task.world["item_id"]]
    script = [{"role": "assistant", "content": answer.format(gold=f"{gold[0].upper()}{gold[1:]}")}]
    trajs, grades = run_episodes(ScriptedGenerator(tok, script), tok, [task], k=2,
                                 params=RolloutParams(max_new_tokens=64), max_turns=2, context=4096,
                                 budget_penalty=0.5, calibration="brier")
    assert CONFIDENCE_INSTRUCTION.strip() in tok.decode(trajs[0].prompt_ids)  # the question asks for it
    assert [t.rewards for t in trajs] == [{"budget": 0.0, "brier": pytest.approx(reward)}] * 2
    assert [(g["grade"], g["confidence"]) for g in grades] == [(grade, confidence)] * 2


def test_an_unknown_calibration_reward_is_refused(tok):
    with pytest.raises(ValueError, match="calibration reward"):
        run_episodes(ScriptedGenerator(tok, []), tok, [_knowledge_task(True)], k=2, params=RolloutParams(),
                     max_turns=1, context=4096, budget_penalty=0.5, calibration="log")
