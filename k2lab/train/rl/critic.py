"""The self-critique rubric reward (K2 report, appendix): a critic model compares the policy's responses to one
prompt pairwise against core and prescriptive rubrics; a response's reward is its win rate.

Each pair is asked in both orders so the critic's position bias cancels; a reply that names no verdict is asked
again, then counts as a tie. The critic is any OpenAI-compatible endpoint reached through
`k2lab.agents.llm.LLM` (in K2, the policy itself; here whatever model `LLM` points at).
"""

from __future__ import annotations

import asyncio
import itertools
import re

CORE_RUBRICS = (
    "Clarity and relevance: the response answers what was asked, stays on topic and is easy to follow.",
    "Conversational fluency and engagement: it reads naturally and keeps the exchange going where that helps.",
    "Objective and grounded interaction: it states what it knows without flattery, invention or evasion.",
)
PRESCRIPTIVE_RUBRICS = (
    "No initial praise: it does not open by praising the question or the user.",
    "No explicit justification: it does not explain why its own answer is good.",
)

CRITIC_PROMPT = """\
Compare two responses to the same prompt against the rubrics below and decide which is better overall.

Rubrics:
{rubrics}

Prompt:
{prompt}

Response A:
{a}

Response B:
{b}

Reply with one short sentence of reasoning, then a last line holding only A, B or TIE."""

_VERDICT = re.compile(r"^[\s*_`\"'(\[]*(A|B|TIE)[\s*_`\"')\].:]*$", re.IGNORECASE)
SCORE = {"A": 1.0, "B": 0.0, "TIE": 0.5}


def parse_verdict(reply: str | None) -> str | None:
    lines = [ln for ln in (reply or "").strip().splitlines() if ln.strip()]
    m = _VERDICT.match(lines[-1]) if lines else None
    return m.group(1).upper() if m else None


async def compare(llm, prompt: str, a: str, b: str, rubrics: tuple[str, ...], max_attempts: int = 2) -> float:
    """1.0 if the critic prefers a, 0.0 if b, 0.5 for a tie or no verdict after `max_attempts` asks."""
    text = CRITIC_PROMPT.format(rubrics="\n".join(f"- {r}" for r in rubrics), prompt=prompt, a=a, b=b)
    for _ in range(max_attempts):
        result = await llm.chat([{"role": "user", "content": text}], temperature=0.0)
        verdict = parse_verdict(result.message.get("content"))
        if verdict:
            return SCORE[verdict]
    return 0.5


async def rubric_rewards(llm, prompt: str, responses: list[str],
                         rubrics: tuple[str, ...] = CORE_RUBRICS + PRESCRIPTIVE_RUBRICS) -> list[float]:
    """Win rate of each of K responses over all pairs, each pair judged in both orders: [K] in [0, 1]."""
    if len(responses) < 2:
        raise ValueError(f"rubric_rewards: pairwise comparison needs at least 2 responses, got {len(responses)}")
    pairs = list(itertools.permutations(range(len(responses)), 2))
    scores = await asyncio.gather(*(compare(llm, prompt, responses[i], responses[j], rubrics) for i, j in pairs))
    wins = [0.0] * len(responses)
    for (i, j), s in zip(pairs, scores):
        wins[i] += s
        wins[j] += 1.0 - s
    return [w / (2 * (len(responses) - 1)) for w in wins]


async def add_critic_reward(llm, trajectories: list, episodes: list[dict], k: int, weight: float = 1.0) -> None:
    """The rubric reward as a component of an environment's reward (for free-form answers): each group of K
    trajectories (K samples of one prompt) is judged pairwise on its episodes' final answers; a trajectory gets
    the component "critic" (its win rate) and `weight` times it added to its total. `episodes[i]` holds the
    prompt and the answer of trajectories[i] (run_episodes' grades)."""
    if len(trajectories) != len(episodes) or len(trajectories) % k:
        raise ValueError(f"add_critic_reward: need groups of {k}, got {len(trajectories)} trajectories and "
                         f"{len(episodes)} episodes")
    starts = range(0, len(trajectories), k)
    wins = await asyncio.gather(*(rubric_rewards(llm, episodes[g]["prompt"], [e["answer"] for e in episodes[g:g + k]])
                                  for g in starts))
    for g, group in zip(starts, wins):
        for traj, win in zip(trajectories[g:g + k], group):
            traj.set_reward({**traj.rewards, "critic": win}, traj.reward + weight * win)
