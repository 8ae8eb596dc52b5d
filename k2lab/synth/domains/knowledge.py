"""Calibration questions about the synthetic encyclopedia, answered without tools.

Tasks draw from the entities not held out for evaluation (k2lab.data.encyclopedia.heldout_entities), so SFT
and RL never ask what `heldout_calibration_set` asks. The system prompt is the calibration eval's answer prompt,
so a model trained here is evaluated under the prompt it was trained with.
Half the tasks ask about seen entities (their facts are in the pre-training corpus): the rubric wants the gold
answer. Half ask about unseen entities (in no training text): the rubric wants an abstention, so SFT data
teaches the model to say it does not know (as R-Tuning does). The rule-based solver knows exactly the seen
entities' facts, which is what a model pre-trained on `corpus_text` could know.
"""

from __future__ import annotations

import random

from k2lab.data.encyclopedia import DOMAIN, TOPIC, answer_sentence, questions
from k2lab.evals.calibration import ANSWER_PROMPT
from k2lab.synth.domains import Domain
from k2lab.synth.env import Task


class Knowledge(Domain):
    name = "knowledge"
    system = ANSWER_PROMPT.format(domain=DOMAIN, topic=TOPIC)
    tools: list[dict] = []

    def __init__(self):
        items = [q for q in questions() if q["split"] == "train"]
        self.known = {q["question"]: q["answer"] for q in items if q["seen"]}
        self.pools = {True: [q for q in items if q["seen"]], False: [q for q in items if not q["seen"]]}

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        q = rng.choice(self.pools[index % 2 == 0])  # alternate seen and unseen
        cp = ({"id": "correct", "kind": "contains", "turn": 0, "contains": [q["gold"]]} if q["seen"]
              else {"id": "abstains", "kind": "abstain", "turn": 0})
        criteria = [f"answers {q['answer']}" if q["seen"] else f"abstains: {q['entity']} is not in its training data"]
        rubric = {"success_criteria": criteria, "expected_tools": [], "checkpoints": [cp]}
        return self.task(rng, task_id, [q["question"]], rubric,
                         {"question": q["question"], "entity": q["entity"], "seen": q["seen"], "item_id": q["id"]})

    def plan(self, task: Task, turn: int, results: list[dict]):
        answer = self.known.get(task.world["question"])
        if answer is None:
            return f"I don't know. I have no reliable information about {task.world['entity']}."
        return answer_sentence(answer)
