"""Does a model answer questions about what it read? Cloze vs question form vs the chat format, per checkpoint.

The calibration claim needs a model that answers questions about the encyclopedia entities it read and declines
the others. `make run`'s base completes 96% of its facts as cloze sentences ("Fathkom was founded in" -> 1567),
yet its SFT model answers ~10% of the held-out known questions. This measures where that is lost, for each
checkpoint given, on the seen entities' questions (k2lab.data.encyclopedia.questions), split into those that
post-training asks ("train") and those held out for the eval ("eval"):

- cloze: the fact's canonical sentence cut before the value (what pre-training text looks like);
- question: "Q: {question}\\nA:" (the form `k2lab pretrain --encyclopedia-qa` mixes in for the train split);
- chat: the calibration eval's system prompt and the question, rendered in the K2.6 chat format with the
  generation prompt, thinking off (how the served model is asked after SFT).

A hit is the gold value in the greedy continuation (up to 10 tokens, its first line or turn). In the chat form
it also asks the unseen entities' questions and counts the replies that decline (k2lab.evals.rules.declines), on
both kinds: a model fit for calibration answers the known and declines the unseen.

    python experiments/knowledge_extraction.py runs/demo/pretrain/checkpoints/step-000800 [more checkpoints]
    python experiments/knowledge_extraction.py "base, QA-mixed=runs/qa_base/checkpoints/step-000800"

A checkpoint may carry a label (`LABEL=DIR`) that names it in the table. Writes
experiments/results/knowledge_extraction.{json,md}; rows measured before under other labels are kept (`--fresh`
drops them), so the table gathers runs that no longer exist on this machine, each with what it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2lab.data.encyclopedia import DOMAIN, TOPIC, cloze_items, questions  # noqa: E402
from k2lab.evals.report import md_table  # noqa: E402
from common import RESULTS, publish  # noqa: E402


def prompts(form: str, items: list[dict]) -> list[str]:
    from k2lab.evals.calibration import ANSWER_PROMPT
    from k2lab.tokenizer.chat import render

    if form == "cloze":
        cloze = {c["id"]: c["prompt"] for c in cloze_items()}
        return [cloze[q["id"]] for q in items]
    if form == "question":
        return [f"Q: {q['question']}\nA:" for q in items]
    system = ANSWER_PROMPT.format(domain=DOMAIN, topic=TOPIC)
    return [render([{"role": "system", "content": system}, {"role": "user", "content": q["question"]}],
                   add_generation_prompt=True, thinking=False) for q in items]


def measure(checkpoint: Path, label: str | None = None) -> dict:
    import torch

    import k2lab
    from k2lab.evals.rules import declines
    from k2lab.serve.rollout import InProcessGenerator, RolloutParams
    from k2lab.tokenizer import Tokenizer

    tok = Tokenizer.load(checkpoint)
    model = k2lab.load_model(str(checkpoint), dtype=torch.float32)
    gen = InProcessGenerator(model, (tok.eos_id, tok.im_end_id))
    asked = questions()
    out: dict = {"checkpoint": str(checkpoint), "label": label or str(checkpoint)}
    for form in ("cloze", "question", "chat"):
        items = asked if form == "chat" else [q for q in asked if q["seen"]]  # cloze: unseen facts are nowhere
        prompt_texts = prompts(form, items)
        ids = [tok.encode(p, allow_special=form == "chat") for p in prompt_texts]
        outs = gen.generate(ids, 1, RolloutParams(max_new_tokens=10, temperature=0.0))
        texts = [tok.decode(o.completion_ids).split("<|im_end|>")[0].strip().split("\n")[0] for o in outs]
        for split in ("train", "eval"):
            hits = [q["gold"].lower() in t.lower() for q, t in zip(items, texts) if q["seen"] and q["split"] == split]
            out[f"{form}/{split}"] = {"hits": sum(hits), "items": len(hits)}
        if form == "chat":  # replies that decline: held-out known questions, and every unseen entity's question
            for key, keep in (("declined_known_eval", lambda q: q["seen"] and q["split"] == "eval"),
                              ("declined_unseen", lambda q: not q["seen"])):
                said = [declines(t) for q, t in zip(items, texts) if keep(q)]
                out[f"chat/{key}"] = {"hits": sum(said), "items": len(said)}
        out[f"{form}/examples"] = [{"prompt": p[-80:], "gold": q["gold"], "answer": t}
                                   for p, q, t in zip(prompt_texts, items, texts) if q["seen"]][:3]
    return out


COLUMNS = [(f"{form}/{split}", f"{form} {split}") for form in ("cloze", "question", "chat")
           for split in ("train", "eval")] + [("chat/declined_known_eval", "chat eval declined"),
                                              ("chat/declined_unseen", "chat unseen declined")]


def report(rows: list[dict]) -> str:
    def cell(r: dict, c: str) -> str:
        return f"{r[c]['hits']}/{r[c]['items']}" if c in r else "not measured"

    table = md_table(["checkpoint", *(name for _, name in COLUMNS)],
                     [[r.get("label", r["checkpoint"]), *(cell(r, c) for c, _ in COLUMNS)] for r in rows])
    return "\n".join([
        "# Knowledge extraction: facts completed as sentences vs answered as questions", "",
        "Seen entities' questions; train = post-training asks them (and `--encyclopedia-qa` mixes them into "
        "pre-training in question form), eval = held out for the calibration eval. Greedy, a hit is the gold "
        "value in the answer. In the chat form, \"declined\" counts the replies that say they do not know: to the "
        "held-out questions about seen entities (which the model read) and to every question about an unseen "
        "entity (which it could not have read). Rows measured in earlier runs are kept, with what they measured "
        "then (\"not measured\": a column added since).", "", table, ""])


def parse_checkpoint(arg: str) -> tuple[str | None, Path]:
    label, sep, path = arg.rpartition("=")
    return (label.strip() or None) if sep else None, Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                    help="checkpoint directories (with their tokenizer files), each optionally named LABEL=DIR")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs from the results")
    args = ap.parse_args()
    given = [parse_checkpoint(c) for c in args.checkpoints]
    for _, p in given:
        if not (p / "config.json").is_file() or not (p / "tiktoken.model").is_file():
            sys.exit(f"{p}: not a checkpoint with its tokenizer (needs config.json and tiktoken.model)")
    rows = [measure(p, label) for label, p in given]
    earlier = RESULTS / "knowledge_extraction.json"
    if not args.fresh and earlier.is_file():
        new = {r["label"] for r in rows}
        rows += [r for r in json.loads(earlier.read_text()) if r.get("label", r["checkpoint"]) not in new]
    publish("knowledge_extraction", rows, report(rows))


if __name__ == "__main__":
    main()
