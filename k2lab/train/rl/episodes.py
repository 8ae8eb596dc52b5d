"""Multi-turn episodes against environments, token in and token out: the glue between a generator, the chat
format and `k2lab.synth.env.Environment`.

An episode: the environment's reset messages and tools are rendered in the K2.6 chat format and encoded once;
with thinking off (the default) the generation prompt ends with `<think></think>`, so a small model answers
directly, and with thinking on it ends with `<think>`, so the policy samples its reasoning, `</think>` and then
the answer (all of it trained; the environment and the rewards see the answer, never the reasoning). The policy
samples a completion (ending at `<|im_end|>`, or cut at the token budget, then `<|im_end|>` is written for it as
an environment token); the completion's text is parsed into an assistant message (content, reasoning and tool
calls) which the environment steps; the observation (tool results, the next user turn) and the next generation
prompt are rendered and appended as environment tokens (loss mask 0). Repeat until the environment is done,
the turn cap, or the model's context is full. The trajectory's ids are what the policy saw and sampled (every
turn's reasoning stays, as K2.6's preserve_thinking renders it); a completion's text is decoded only to step
the environment, never re-encoded.

Knowledge tasks are rewarded with the ternary calibration reward (+1 / -1 / 0) or, with calibration="brier",
the Brier reward on a stated confidence; the system prompt then asks for one (`rewards.CONFIDENCE_INSTRUCTION`).

The generator interface is `generate(prompts: list[list[int]], k, RolloutParams) -> list[RolloutSample]`
(prompt-major, K consecutive samples per prompt) with a `policy_version`; `k2lab.serve.rollout.
InProcessGenerator` is its in-process backend and `k2lab.serve.rollout_client.RemoteGenerator` its
OpenAI-compatible server backend (token ids in and out; k2lab.train.rl.rollouts chooses).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Protocol, Sequence

from k2lab.data.encyclopedia import questions
from k2lab.evals import rules
from k2lab.serve.rollout import RolloutParams, RolloutSample
from k2lab.synth.env import Environment, Task
from k2lab.synth.domains import registry
from k2lab.tokenizer.chat import segments
from k2lab.tokenizer.toolcalls import parse
from k2lab.train.rl import rewards
from k2lab.train.rl.trajectory import Trajectory
from k2lab.train.settings import RL_CALIBRATION_REWARDS


class Generator(Protocol):
    policy_version: int

    def generate(self, prompts: Sequence[Sequence[int]], k: int = 1,
                 params: RolloutParams = RolloutParams()) -> list[RolloutSample]: ...


def encode_turns(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                 add_generation_prompt: bool = True, thinking: bool = False) -> list[int]:
    """Token ids of rendered messages: markers as their special ids, text encoded with special tokens
    disallowed, so environment text that spells a marker stays text. The generation prompt ends with
    `<think></think>` (thinking off) or `<think>` (on)."""
    ids: list[int] = []
    for text, is_marker, _ in segments(messages, tools, add_generation_prompt, thinking=thinking):
        ids += [tokenizer.special_tokens[text]] if is_marker else tokenizer.encode(text) if text else []
    return ids


def sub_seed(*parts) -> int:
    """A 63-bit seed from its parts (seed, step, turn, ...), the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@functools.cache
def _golds() -> dict[str, str]:
    return {q["id"]: q["gold"] for q in questions()}


def _gold(task: Task) -> str:
    return _golds()[task.world["item_id"]]


def score(env: Environment, traj: Trajectory, over_budget: bool, budget_penalty: float,
          calibration: str = "ternary", wrong_reward: float = -1.0) -> dict:
    """Reward components of a finished episode and its grade. Knowledge (calibration QA): the rules grader on
    the final answer, +1 correct, `wrong_reward` (-1) wrong, 0 abstained (seen and unseen entities alike: for
    an entity the model never saw a guess is most likely wrong), or with calibration="brier"
    1 - (confidence - correct)^2 on the stated confidence (the grade then also holds that confidence). Tool
    domains: the share of the rubric's checkpoints that pass (tool calls really executed, answers checked
    numerically). Coding: the share of its unit tests that pass in the sandbox. Every domain: the budget
    penalty."""
    components = {"budget": rewards.budget(over_budget, budget_penalty)}
    extra: dict = {}
    if env.task.domain == "knowledge":
        answer = env.answers[0] if env.answers else ""
        if calibration == "brier":
            components["brier"] = rewards.brier(answer, _gold(env.task))
            extra["confidence"] = rewards.stated_confidence(answer)
            answer = rewards.without_confidence(answer)
        else:
            components["calibration"] = rewards.calibration(answer, _gold(env.task), wrong=wrong_reward)
        letter = rules.grade(answer, _gold(env.task))
        # saying nothing is no abstention (rewards.calibration pays it as wrong), so the metrics count it so too
        grade = {"A": "correct", "B": "wrong", "D": "abstained" if rules.declines(answer) else "wrong"}[letter]
    else:
        verdicts = env.verdicts()
        name = "unit_tests" if env.task.domain == "coding" else "rubric"  # coding: the share of tests passing
        components[name] = sum(v["passed"] for v in verdicts) / len(verdicts)
        grade = "correct" if components[name] == 1.0 else "wrong"
    total, components = rewards.compose(components)
    traj.set_reward(components, total)
    return {"grade": grade, "domain": env.task.domain, **extra}


def run_episodes(generator: Generator, tokenizer, tasks: list[Task], k: int, params: RolloutParams,
                 max_turns: int, context: int, budget_penalty: float, seed: int = 0,
                 timings: dict | None = None, thinking: bool = False,
                 calibration: str = "ternary", wrong_reward: float = -1.0) -> tuple[list[Trajectory], list[dict]]:
    """K episodes of each task (prompt-major: K consecutive trajectories per task) and their grades (with each
    episode's first user turn and final answer). Turn t samples with seed sub_seed(seed, t), so the episodes are
    a function of (seed, tasks, weights). `thinking`: the K2.6 thinking mode (see the module docstring);
    `calibration`: the knowledge tasks' reward, "ternary" (a wrong answer paid `wrong_reward`) or "brier".
    `timings`, when given, gets the seconds spent sampling ("generate_s"), stepping the environments ("env_s")
    and scoring ("reward_s")."""
    if calibration not in RL_CALIBRATION_REWARDS:
        raise ValueError(f"calibration reward must be one of {RL_CALIBRATION_REWARDS}, got {calibration!r}")
    if calibration == "brier":  # the question asks for the confidence the reward reads
        tasks = [dataclasses.replace(t, system=t.system + rewards.CONFIDENCE_INSTRUCTION)
                 if t.domain == "knowledge" else t for t in tasks]
    clock = {"generate_s": 0.0, "env_s": 0.0, "reward_s": 0.0}
    t0 = time.perf_counter()
    reg = registry()
    envs = [Environment(reg[t.domain], t, seed=seed, max_steps=max_turns) for t in tasks for _ in range(k)]
    starts = [env.reset() for env in envs]
    prompts = [encode_turns(tokenizer, msgs, tools or None, thinking=thinking) for msgs, tools in starts[::k]]
    trajs = [Trajectory(prompt_ids=prompts[i // k], policy_version=generator.policy_version) for i in range(len(envs))]
    over = [False] * len(envs)
    live = list(range(len(envs)))
    im_end = tokenizer.special_tokens["<|im_end|>"]
    for turn in range(max_turns):
        turn_params = dataclasses.replace(params, seed=sub_seed(seed, turn), stop_token_ids=(im_end,))
        t1 = time.perf_counter()
        if turn == 0:
            out = generator.generate(prompts, k, turn_params)
        else:
            out = generator.generate([trajs[i].prompt_ids + trajs[i].completion_ids for i in live], 1, turn_params)
        clock["generate_s"] += time.perf_counter() - t1
        still = []
        for i, sample in zip(live, out):
            traj, env = trajs[i], envs[i]
            traj.add_sampled(sample.completion_ids, sample.logprobs)
            traj.finish_reason = sample.finish_reason
            text = tokenizer.decode(sample.completion_ids)
            if sample.finish_reason == "length":  # the turn ran over its budget: close it for the policy
                over[i] = True
                traj.add_environment([im_end])
            message = parse(text.removesuffix("<|im_end|>"), env.tools or None, in_reasoning=thinking).to_message()
            obs, _, done = env.step(message)
            if not done:
                traj.add_environment(encode_turns(tokenizer, obs, thinking=thinking))
                done = len(traj.prompt_ids) + len(traj.completion_ids) + params.max_new_tokens > context
            if not done:
                still.append(i)
        live = still
        if not live:
            break
    t1 = time.perf_counter()
    grades = [score(env, traj, o, budget_penalty, calibration, wrong_reward)
              | {"prompt": env.task.turns[0], "answer": env.answers[-1] if env.answers else ""}
              for env, traj, o in zip(envs, trajs, over)]
    for env in envs:
        env.close()
    clock["reward_s"] = time.perf_counter() - t1
    clock["env_s"] = t1 - t0 - clock["generate_s"]
    if timings is not None:
        timings.update(clock)
    return trajs, grades
