"""SFT data side: packed rows compute exactly what each conversation computes alone (block-diagonal mask,
positions restarting per document), loss masks select exactly the assistant's output, batches are a pure
function of (seed, step), and the loop's loss on them is the masked cross-entropy of each conversation."""

import json

import pytest
import torch
import torch.nn.functional as F

from k2lab.optim.qk_clip import track_max_logits
from k2lab.tokenizer.chat import render_assistant
from k2lab.train.loop import evaluate, token_losses
from k2lab.train.sft import PAD_DOCUMENT, batches_from, pack, read_conversations, render, split
from tests.conftest import random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=3)


def random_docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 500, (n,), generator=g).tolist(), [0] + [1] * (n - 1)) for n in lengths]


@torch.no_grad()
def test_packed_row_logits_equal_each_conversation_alone(model):
    docs = random_docs([7, 12, 5, 9, 16])
    packed = pack(docs, seq_len=26, pad_id=511)
    assert packed.document_ids[0].tolist()[:25] == [0] * 7 + [1] * 12 + [2] * 5 + [-1] and packed.dropped == []
    logits = model(packed.input_ids, document_ids=packed.document_ids)
    for doc, (ids, _) in enumerate(docs):
        alone = model(torch.tensor([ids]))[0]
        row, cols = (packed.document_ids == doc).nonzero(as_tuple=True)
        torch.testing.assert_close(logits[row, cols], alone, atol=1e-5, rtol=0)
    # without the document ids the later conversations see the earlier ones: the mask is what makes them equal
    mixed = model(packed.input_ids)[0, 7:19]
    assert (mixed - model(torch.tensor([docs[1][0]]))[0]).abs().max() > 1e-3


@torch.no_grad()
def test_packed_max_logits_are_those_of_the_documents(model):
    """QK-Clip statistics on packed rows count only pairs that attend (same document, causal)."""
    docs = random_docs([6, 10], seed=1)
    packed = pack(docs, seq_len=16, pad_id=511)
    track_max_logits(model)
    try:
        model(packed.input_ids, document_ids=packed.document_ids)
        packed_max = [m.self_attn.max_logits.clone() for m in model.model.layers]
        alone = []
        for ids, _ in docs:
            model(torch.tensor([ids]))
            alone.append([m.self_attn.max_logits.clone() for m in model.model.layers])
    finally:
        track_max_logits(model, False)
    for layer, got in enumerate(packed_max):
        torch.testing.assert_close(got, torch.maximum(alone[0][layer], alone[1][layer]))


def test_document_ids_refuse_a_cache(model):
    with pytest.raises(ValueError, match="without a cache"):
        model(torch.zeros(1, 4, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long),
              positions=torch.arange(4)[None])


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You help with weather."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                   "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18 C, sunny"},
                  {"role": "assistant", "content": "It is 18 C and sunny in Paris."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}]},
    {"messages": [{"role": "user", "content": "Who wrote the Zarnik Codex?"},
                  {"role": "assistant", "content": "I don't know."}]},
    {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spans(ids, mask):
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("thinking", [False, True])
def test_loss_mask_selects_exactly_assistant_tokens(tok, tmp_path, thinking):
    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    packed = pack(render(tok, read_conversations([data]), thinking), seq_len=400, pad_id=tok.pad_id)
    batches = batches_from(packed, batch_size=2, seed=0)
    assert packed.dropped == []
    seen = set()
    for r in range(len(packed.input_ids)):
        for doc in sorted(set(packed.document_ids[r].tolist()) - {PAD_DOCUMENT}):
            sel = packed.document_ids[r] == doc
            ids, mask = packed.input_ids[r][sel].tolist(), packed.loss_mask[r][sel].tolist()
            # thinking off: `<think></think>` is prompt-side, the model generates content, calls and <|im_end|>
            want = [render_assistant(m, thinking=thinking) + "<|im_end|>" for m in CONVERSATIONS[doc]["messages"]
                    if m["role"] == "assistant"]
            assert [tok.decode(s) for s in spans(ids, mask)] == want
            seen.add(doc)
    assert seen == {0, 1, 2}
    assert (packed.loss_mask[packed.document_ids == PAD_DOCUMENT] == 0).all()
    b = batches(0)
    assert set(b) == {"tokens", "loss_mask", "document_ids"}
    assert b["tokens"].shape == b["document_ids"].shape == (2, 400) and b["loss_mask"].shape == (2, 399)
    # the loop's mask is on targets: token t+1 is trained when it is assistant output of t's conversation
    for r in range(2):
        for t in range(399):
            same = b["document_ids"][r, t] == b["document_ids"][r, t + 1]
            row = int((packed.input_ids == b["tokens"][r]).all(1).nonzero()[0])
            assert b["loss_mask"][r, t] == int(bool(packed.loss_mask[row, t + 1]) and bool(same))


def test_batches_are_a_pure_function_of_seed_and_step():
    packed = pack(random_docs([5] * 10), seq_len=10, pad_id=511)  # 5 rows of two conversations
    b = batches_from(packed, batch_size=2, seed=7)
    again = batches_from(packed, batch_size=2, seed=7)
    for step in (0, 3, 11):
        for key in ("tokens", "loss_mask", "document_ids"):
            assert torch.equal(b(step)[key], again(step)[key])
    epoch = torch.cat([b(s)["tokens"] for s in range(5)])  # 10 rows = two epochs of 5
    for half in (epoch[:5], epoch[5:]):
        assert sorted(map(tuple, half.tolist())) == sorted(map(tuple, packed.input_ids.tolist()))
    assert not torch.equal(epoch[:5], epoch[5:])  # each epoch is its own permutation
    other = batches_from(packed, batch_size=2, seed=8)
    assert any(not torch.equal(b(s)["tokens"], other(s)["tokens"]) for s in range(5))


def masked_loss(model, batch):
    """The loop's per-step loss: token_losses with the document ids, averaged over the loss mask."""
    losses = token_losses(model, batch["tokens"], document_ids=batch["document_ids"])
    return (losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def test_loop_loss_is_masked_cross_entropy_per_conversation(model):
    docs = random_docs([6, 9, 4], seed=2)
    docs[1] = (docs[1][0], [0, 0, 0, 1, 1, 0, 1, 1, 1])
    packed = pack(docs, seq_len=20, pad_id=511)
    batch = batches_from(packed, batch_size=1, seed=0)(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in docs:
            logits = model(torch.tensor([ids]))[0, :-1]
            m = torch.tensor(mask[1:]).bool()
            total += float(F.cross_entropy(logits[m], torch.tensor(ids[1:])[m], reduction="sum"))
            count += int(m.sum())
        assert float(masked_loss(model, batch)) == pytest.approx(total / count, rel=1e-5)
        assert evaluate(model, batch, micro=1) == pytest.approx(total / count, rel=1e-5)
    # it trains: a few steps on the batch lower it
    trained = random_model(tiny_config(), seed=3).train()
    opt = torch.optim.Adam(trained.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = masked_loss(trained, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1


@torch.no_grad()
def test_distill_loss_is_the_kl_from_the_teacher_per_conversation(model):
    """--distill's per-token loss: KL(teacher || model) of the next-token distributions, each packed conversation
    computed as if alone, 0 where the model is the teacher."""
    from k2lab.train.sft import distill_losses

    student = random_model(tiny_config(), seed=4)
    docs = random_docs([6, 9, 4], seed=5)
    packed = pack(docs, seq_len=20, pad_id=511)
    batch = batches_from(packed, batch_size=1, seed=0)(0)
    losses = distill_losses(model, student, batch["tokens"], batch["document_ids"])[0]
    for doc, (ids, _) in enumerate(docs):
        p = F.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)
        q = F.log_softmax(student(torch.tensor([ids]))[0, :-1], -1)
        by_hand = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # sum p (log p - log q)
        cols = (batch["document_ids"][0, 1:] == doc) & (batch["document_ids"][0, :-1] == doc)
        torch.testing.assert_close(losses[cols.nonzero()[:, 0]], by_hand, atol=1e-5, rtol=1e-4)
    assert losses.min() > 0
    assert distill_losses(model, model, batch["tokens"], batch["document_ids"]).abs().max() < 1e-5


def test_packing_drops_what_does_not_fit_and_reports_it():
    packed = pack(random_docs([4, 30, 6]), seq_len=10, pad_id=511)
    assert packed.dropped == [1] and packed.input_ids.shape == (1, 10) and packed.fill == 1.0
    with pytest.raises(ValueError, match="no conversation fits"):
        pack(random_docs([30]), seq_len=10, pad_id=511)


def test_bad_input_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVERSATIONS[1]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_conversations([bad])
    with pytest.raises(ValueError, match="no such file"):
        read_conversations([tmp_path / "missing.jsonl"])
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"q.jsonl:1: no assistant message"):
        render(tok, read_conversations([no_answer]))
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"r.jsonl:1: messages\[0\]: role"):
        render(tok, read_conversations([bad_role]))


def test_turns_with_reasoning_are_trained_in_their_own_context(tok):
    """K2.6 drops earlier turns' reasoning: a conversation with reasoning becomes one example per user turn, each
    training only its trailing assistant turn, reasoning included, after the context the model saw then."""
    from k2lab.tokenizer.chat import render
    from k2lab.train.sft import render as render_examples, turns

    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "add them"},
                {"role": "user", "content": "times 3?"},
                {"role": "assistant", "content": "12", "reasoning_content": "multiply"}]
    assert [len(t) for t in turns(messages)] == [2, 4]
    assert turns([{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]) == \
        [[{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]]
    (ids1, mask1), (ids2, mask2) = render_examples(tok, [{"messages": messages}], thinking=True)
    assert [tok.decode(s) for s in spans(ids1, mask1)] == ["add them</think>4<|im_end|>"]
    assert [tok.decode(s) for s in spans(ids2, mask2)] == ["multiply</think>12<|im_end|>"]
    # the second example's context is what a server renders for that turn: earlier reasoning dropped
    prompt = render(messages[:3], add_generation_prompt=True)
    assert tok.decode(ids2).startswith(prompt) and "add them" not in tok.decode(ids2)


def test_held_out_split_is_by_conversation_and_seeded():
    convs = [{"messages": [], "i": i} for i in range(20)]
    train, val = split(convs, 0.25, seed=3)
    assert len(val) == 5 and sorted(c["i"] for c in train + val) == list(range(20))
    assert split(convs, 0.25, seed=3) == (train, val) and split(convs, 0.25, seed=4)[1] != val
    assert len(split(convs, 0.01, seed=0)[1]) == 1 and split(convs, 0.0, seed=0)[1] == []
    with pytest.raises(ValueError, match="none to train on"):
        split(convs[:1], 0.5, seed=0)


def test_toolcall_eval_scores_reference_answers_as_perfect_and_silence_as_no_recall(tok):
    """The in-training eval's parsing and scoring (k2lab.evals.toolcall's): the reference turns themselves, as
    the model would generate them, score F1 1 and schema accuracy 1; answering nothing but text scores recall 0;
    a call with arguments off the schema counts against schema accuracy."""
    from k2lab.tokenizer.chat import render_assistant
    from k2lab.train.toolcall_eval import ToolcallEval, requests_from_conversations

    ev = ToolcallEval(requests_from_conversations(CONVERSATIONS, thinking=True), tok, max_new_tokens=16, max_len=4096)
    assert [ev.reference[r["id"]] for r in ev.rows] == ["tool_calls", "stop", "stop"]
    firsts = [next(m for m in c["messages"] if m["role"] == "assistant") for c in CONVERSATIONS]
    perfect = [(tok.encode(render_assistant(m), allow_special=True), "stop") for m in firsts]
    assert ev.score(perfect) == {"toolcall_f1": 1.0, "toolcall_precision": 1.0, "toolcall_recall": 1.0,
                                 "toolcall_schema_accuracy": 1.0}
    silent = [(tok.encode("</think>Sure."), "stop")] * 3
    assert ev.score(silent) == {"toolcall_f1": 0.0, "toolcall_precision": None, "toolcall_recall": 0.0,
                                "toolcall_schema_accuracy": None}
    bad = dict(firsts[0], tool_calls=[{"id": "functions.get_weather:0", "type": "function",
                                        "function": {"name": "get_weather", "arguments": "{\"city\": 3}"}}])
    wrong = [(tok.encode(render_assistant(bad), allow_special=True), "stop")] + perfect[1:]
    assert ev.score(wrong)["toolcall_f1"] == 1.0 and ev.score(wrong)["toolcall_schema_accuracy"] == 0.0
    # a call cut off by the cap: the model decided to call (trigger), but the call is not valid
    cut = [(perfect[0][0][:-3], "length")] + perfect[1:]
    assert ev.score(cut)["toolcall_f1"] == 1.0 and ev.score(cut)["toolcall_schema_accuracy"] == 0.0
    # without tools declared, call markup in the answer is not a tool call (as a server without tools treats it)
    chatty = perfect[:1] + [perfect[0]] + perfect[2:]
    assert ev.score(chatty)["toolcall_precision"] == 1.0
