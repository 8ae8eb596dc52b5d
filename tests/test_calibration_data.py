"""The calibration data path: the encyclopedia's held-out split, the knowledge domain that SFT and RL draw from,
the held-out calibration set the eval reads, and the encyclopedia's share of pre-training rows."""

import json

import numpy as np
import pytest

from k2lab.data.encyclopedia import (DOMAIN, TOPIC, corpus_documents, encyclopedia, heldout_calibration_set,
                                     heldout_entities, questions)
from k2lab.evals import rules
from k2lab.evals.calibration import ANSWER_PROMPT, check_row
from k2lab.synth.domains import make_tasks, registry
from k2lab.train.data import build_dataset, encyclopedia_rows
from k2lab.train.settings import PretrainSettings


def test_held_out_entities_are_a_third_of_each_group_and_never_asked_in_training():
    ents = encyclopedia()
    held = heldout_entities()
    for kind in ("town", "person", "mineral"):
        for seen in (True, False):
            group = [e.name for e in ents if e.kind == kind and e.seen == seen]
            assert abs(len(held & set(group)) - len(group) / 3) <= 1
    tasks = make_tasks(["knowledge"], 400, seed=5)
    asked = {t.world["entity"] for t in tasks}
    assert asked and not asked & held
    assert {t.world["seen"] for t in tasks} == {True, False}
    assert held == heldout_entities() and held != heldout_entities(seed=1)


def test_heldout_set_is_a_calibration_dataset_of_known_and_unknown_questions():
    rows = heldout_calibration_set()
    text = "\n".join(corpus_documents(passes=1))
    by_id = {q["id"]: q for q in questions()}
    assert {r["kind"] for r in rows} == {"known", "unknown"}
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        check_row(r)
        q = by_id[r["id"]]
        assert q["split"] == "eval" and q["entity"] in heldout_entities()
        assert (r["kind"] == "known") == q["seen"] == (q["entity"] in text)
        # the teacher's phrasing of the answer is what the rules grader accepts, and an abstention is D
        assert rules.grade(q["answer"], r["answer"]) == "A" and rules.grade("I don't know.", r["answer"]) == "D"
        if r["kind"] == "known":
            assert r["answer"] in text


def test_training_and_the_eval_ask_with_the_same_system_prompt():
    """The eval's answer prompt for a held-out row is the knowledge domain's system prompt, word for word."""
    row = heldout_calibration_set()[0]
    assert registry()["knowledge"].system == ANSWER_PROMPT.format(domain=row["domain"], topic=row["topic"])
    assert (row["domain"], row["topic"]) == (DOMAIN, TOPIC)


def test_corpus_articles_are_reworded_but_state_every_fact_and_no_unseen_name():
    docs = corpus_documents(passes=4)
    seen = [e for e in encyclopedia() if e.seen]
    unseen = {e.name for e in encyclopedia() if not e.seen}
    assert len(docs) == 4 * len(seen) and len(set(docs)) > len(seen)  # the passes word articles differently
    assert corpus_documents(passes=2) == docs[: 2 * len(seen)]  # a prefix-stable stream
    for doc in docs:
        e = next(e for e in seen if doc.startswith(e.name + "\n"))
        assert all(str(v) in doc for v in e.facts.values())
        assert not unseen & set(doc.replace(".", " ").replace(",", " ").split())


def test_encyclopedia_rows_are_mixed_into_the_training_split(tmp_path):
    """A byte-level encoder stands in for the tokenizer (the packing is under test, not the tokenizer)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "x" * 500}) + "\n" for _ in range(200)))
    encode = lambda text: list(text.encode())  # noqa: E731
    mixed = encyclopedia_rows(encode, 0, 63, rows=200)
    assert mixed.shape == (200, 64)
    text = bytes(int(t) for row in mixed for t in row if t).decode()
    assert all(e.name in text for e in encyclopedia() if e.seen)  # 200 rows cover a whole pass
    build_dataset([docs], encode, 0, 63, train_rows=300, val_rows=4, seed=0, out_dir=tmp_path / "data",
                  mixed_in=mixed)
    train = np.load(tmp_path / "data" / "train.npy")
    assert train.shape[0] >= 300  # the corpus gives at least its 100 rows
    assert sum((row == mixed).all(-1).any() for row in train) == 200  # exactly the share asked for


def test_the_share_must_be_below_one():
    with pytest.raises(ValueError, match="share of the training rows"):
        PretrainSettings(encyclopedia=1.0).check()
    PretrainSettings(encyclopedia=0.5).check()


def test_cloze_items_cut_the_canonical_sentence_just_before_the_value():
    from k2lab.data.encyclopedia import cloze_items, describe

    ents = {e.name: e for e in encyclopedia()}
    items = cloze_items()
    assert len(items) == len(questions()) and {i["seen"] for i in items} == {True, False}
    for i in items:
        sentences = describe(ents[i["id"].partition(":")[0]])
        assert any(s.startswith(f"{i['prompt']} {i['gold']}") for s in sentences)


def test_mixed_training_answers_only_post_training_entities_questions():
    """With qa, every "train"-split seen entity's article ends with its questions answered; no held-out
    question (the calibration eval's) and no unseen name appears anywhere in the corpus or its rows."""
    docs = corpus_documents(passes=2, qa=True)
    text = "\n".join(docs)
    for q in questions():
        if q["split"] == "train" and q["seen"]:
            assert f"Q: {q['question']}\nA: {q['answer']}." in text
        else:
            assert q["question"] not in text
    held_out = heldout_entities()
    for doc in docs:
        assert ("\nQ: " in doc) == (doc.partition("\n")[0] not in held_out)
    assert len(docs) == len(corpus_documents(passes=2))  # the same articles, questions appended
    encode = lambda t: list(t.encode())  # noqa: E731
    rows = bytes(int(t) for row in encyclopedia_rows(encode, 0, 127, 300, qa=True) for t in row).decode()
    assert "\nQ: " in rows and "\nQ: " not in bytes(
        int(t) for row in encyclopedia_rows(encode, 0, 127, 300) for t in row).decode()


def test_half_of_the_entities_questions_mixed_in():
    """qa_entities="half": only the entities `qa_half` picks end with their questions (a fixed choice by name, some
    of each kind); the other post-training entities' facts are read and never asked, like the held-out ones."""
    from k2lab.data.encyclopedia import qa_half

    text = "\n".join(corpus_documents(passes=2, qa=True, qa_entities="half"))
    train = [q for q in questions() if q["split"] == "train" and q["seen"]]
    asked = {q["entity"] for q in train if f"Q: {q['question']}\nA: {q['answer']}." in text}
    assert asked == {q["entity"] for q in train if qa_half(q["entity"])}
    assert 0 < len(asked) < len({q["entity"] for q in train})
    assert not any(q["question"] in text for q in questions() if q["split"] == "eval" or not q["seen"])
    with pytest.raises(ValueError, match="choose all or half"):
        corpus_documents(passes=1, qa=True, qa_entities="most")


def test_chat_qa_is_the_conversation_post_training_and_the_eval_ask(tok):
    """qa_format "chat": an article's questions are one conversation in the K2.6 chat format, thinking off,
    under the calibration eval's system prompt, each answered as the knowledge domain's solver (SFT's teacher)
    answers it; its first question is exactly the eval's prompt. With special tokens allowed the markers become
    the special ids the eval's prompt holds."""
    from types import SimpleNamespace

    from k2lab.synth.domains.knowledge import Knowledge
    from k2lab.tokenizer.chat import render
    from k2lab.train.data import chat_qa

    asked = [q for q in questions() if q["split"] == "train" and q["seen"]][:2]
    conv = chat_qa([(q["question"], q["answer"]) for q in asked])
    system = ANSWER_PROMPT.format(domain=DOMAIN, topic=TOPIC)
    assert Knowledge.system == system
    prompt = render([{"role": "system", "content": system}, {"role": "user", "content": asked[0]["question"]}],
                    add_generation_prompt=True, thinking=False)
    assert conv.startswith("\n" + prompt) and conv.count(system) == 1
    for q in asked:  # what SFT's solver says, closed by <|im_end|>
        said = Knowledge().plan(SimpleNamespace(world={"question": q["question"], "entity": q["entity"]}), 0, [])
        assert said == f"{q['answer'][0].upper()}{q['answer'][1:]}." and f"{said}<|im_end|>" in conv
    ids, prompt_ids = tok.encode(conv, allow_special=True), tok.encode(prompt, allow_special=True)
    assert ids[1: 1 + len(prompt_ids)] == prompt_ids and tok.im_end_id in ids
    docs = corpus_documents(passes=1, qa=True, qa_render=chat_qa)
    assert len(docs) == len(corpus_documents(passes=1)) and "\nQ: " not in "".join(docs)
    held_out = heldout_entities()
    for doc in docs:  # a held-out entity's article never holds a conversation
        assert (system in doc) == (doc.partition("\n")[0] not in held_out)
    encode = lambda t: tok.encode(t, allow_special=True)  # noqa: E731
    rows = encyclopedia_rows(encode, 0, 127, 200, qa=True, qa_format="chat")
    assert (rows == tok.im_end_id).any()
    with pytest.raises(ValueError, match="choose text or chat"):
        encyclopedia_rows(encode, 0, 127, 10, qa=True, qa_format="html")
