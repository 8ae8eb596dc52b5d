"""SFT data for tool use: procedurally generated tools split into training and held-out pools that never meet,
the held-out tool-call eval set, and SFT rendering that is token for token what RL episodes and the server render
(thinking off), with the loss on exactly the assistant's output."""

from __future__ import annotations

import json
import re

import pytest

from k2lab.synth import solver
from k2lab.synth.domains import make_tasks, registry
from k2lab.synth.domains.toolbox import NOUNS, PARAMS, pool
from k2lab.synth.env import Environment
from k2lab.synth.heldout import heldout_toolcall_set
from k2lab.synth.pipeline import decide, episode
from k2lab.tokenizer.chat import render_assistant
from k2lab.train.rl.episodes import encode_turns
from k2lab.train.sft import render
from k2lab.train.toolcall_eval import ToolcallEval, prompt_ids

REG = registry()


def play(task, fault_rate=0.0):
    env = Environment(REG[task.domain], task, fault_rate=fault_rate, seed=1)
    return decide(episode(env, lambda messages, tools: solver.solve(REG[task.domain], task, messages)))


def tool_names_and_params(tools):
    return ({t["function"]["name"] for t in tools},
            {p for t in tools for p in t["function"]["parameters"]["properties"]})


def test_pools_split_disjoint_and_the_sft_data_never_holds_a_heldout_tool():
    assert not set(pool(NOUNS, "train")) & set(pool(NOUNS, "heldout"))
    assert not set(pool(PARAMS, "train")) & set(pool(PARAMS, "heldout"))
    assert sorted(pool(NOUNS, "train") + pool(NOUNS, "heldout")) == sorted(NOUNS)
    held = heldout_toolcall_set(seed=3, n=40)
    held_names, held_params = set(), set()
    for row in held:
        names, params = tool_names_and_params(row["tools"])
        held_names |= names
        held_params |= params
    assert held_params <= set(pool(PARAMS, "heldout"))
    # the SFT data of `k2lab synth --domains embedded` (the toolbox's training tools among the other domains)
    recs = [play(t, 0.15) for t in make_tasks(["toolbox"] * 5 + ["arithmetic", "lookup"], 70, seed=0)]
    recs = [r for r in recs if r["accepted"]]  # what `k2lab synth` keeps
    assert len(recs) > 60
    text = json.dumps([{"messages": r["messages"], "tools": r["tools"]} for r in recs])
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not held_names & set(re.findall(r"[a-z]+_[a-z]+", text))  # no held-out tool name anywhere
    assert not set(pool(NOUNS, "heldout")) & words  # nor any held-out noun, in tools, requests or answers
    for r in recs:
        names, params = tool_names_and_params(r["tools"])
        assert not names & held_names and not params & held_params


def test_generator_and_eval_set_are_deterministic_from_the_seed():
    a = [t.as_dict() for t in make_tasks(["toolbox"], 20, seed=4)]
    assert a == [t.as_dict() for t in make_tasks(["toolbox"], 20, seed=4)]
    assert a != [t.as_dict() for t in make_tasks(["toolbox"], 20, seed=5)]
    assert len({tuple(sorted(t["world"]["tools"][0]["function"]["parameters"]["properties"])) for t in a}) > 5
    rows = heldout_toolcall_set(seed=1, n=30)
    assert rows == heldout_toolcall_set(seed=1, n=30) and rows != heldout_toolcall_set(seed=2, n=30)
    expect = [r["expect"] for r in rows]
    assert 0.4 <= expect.count("tool_calls") / len(rows) <= 0.8 and "stop" in expect  # positives and negatives
    assert all(r["chat_template_kwargs"] == {"thinking": False} and r["temperature"] == 0.0 for r in rows)


def test_every_task_kind_is_solved_and_calls_are_multi_turn():
    recs = [play(t) for t in make_tasks(["toolbox"], 60, seed=2)]
    assert all(r["accepted"] and r["reward"] == 1.0 for r in recs)
    kinds = {}
    for r in recs:
        calls = [m for m in r["messages"] if m.get("tool_calls")]
        kinds.setdefault("call" if calls else "direct", []).append(r)
    assert len(kinds["call"]) > 20 and len(kinds["direct"]) > 10
    call = kinds["call"][0]["messages"]
    assert [m["role"] for m in call][-2:] == ["tool", "assistant"] or call[-2]["role"] == "user"
    assert any("receipt" in (m.get("content") or "") for m in call if m["role"] == "assistant")


def test_sft_renders_what_episodes_and_the_server_render_and_trains_only_assistant_output(tok):
    """Thinking off: the ids are encode_turns' (RL episodes) for the whole conversation; before each trained span
    stands exactly the server's prompt for the messages so far (chat_template_kwargs thinking false), and the
    span is what the model generates: content, tool-call section, <|im_end|>. System, user and tool results
    carry no loss."""
    rec = next(r for r in (play(t, 0.3) for t in make_tasks(["toolbox"], 40, seed=6)) if len(r["messages"]) > 6)
    messages, tools = rec["messages"], rec["tools"]
    assert [m["role"] for m in messages][:4] == ["system", "user", "assistant", "tool"]
    (ids, mask), = render(tok, [rec])
    assert ids == encode_turns(tok, messages, tools, add_generation_prompt=False)
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(assistant)
    for start, k in zip(starts, assistant):
        assert ids[:start] == prompt_ids(tok, messages[:k], tools, {"thinking": False})
        end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
        assert tok.decode(ids[start:end]) == render_assistant(messages[k], thinking=False) + "<|im_end|>"
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in messages:
        if m["role"] != "assistant":
            assert (m["content"] or "") in untrained


def test_heldout_set_scores_through_the_in_training_eval(tok):
    """The eval rows drive ToolcallEval as they are (rendered with their chat_template_kwargs): the teacher's own
    first answers score F1 1 and schema accuracy 1; text-only answers score recall 0."""
    rows = heldout_toolcall_set(seed=5, n=12)
    tasks = {t.task_id: t for t in make_tasks(["toolbox_heldout"], 12, seed=5)}
    ev = ToolcallEval(rows, tok, max_new_tokens=8, max_len=4096)
    assert len(ev.rows) == 12 and all(p[-2:] == [tok.special_tokens["<think>"], tok.special_tokens["</think>"]]
                                      for p in ev.prompts)
    firsts = [solver.solve(REG["toolbox_heldout"], tasks[r["id"]], r["messages"]) for r in rows]
    perfect = [(tok.encode(render_assistant(m, thinking=False), allow_special=True), "stop") for m in firsts]
    assert ev.score(perfect) == {"toolcall_f1": 1.0, "toolcall_precision": 1.0, "toolcall_recall": 1.0,
                                 "toolcall_schema_accuracy": 1.0}
    silent = [(tok.encode("Sure."), "stop")] * len(rows)
    assert ev.score(silent)["toolcall_recall"] == 0.0


@pytest.mark.parametrize("bad, message", [("[1, 2]\n", "expected a JSON object"), ('{"messages": []}\n', "non-empty"),
                                          ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no 'expect'")])
def test_a_bad_eval_set_is_refused_before_the_run_starts(tok_dir, tmp_path, bad, message):
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.settings import SftSettings
    from k2lab.train.sft import prepare

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(bad)
    s = SftSettings(checkpoint="x", data=[str(data)], eval_toolcalls=str(evalset), val_fraction=0)
    with pytest.raises(ValueError, match=f"--eval-toolcalls .*{message}"):
        prepare(s, Tokenizer.load(tok_dir))


def test_small_talk_and_no_tool_rubrics_reject_garbled_replies():
    """The rubric (also RL's reward) of a task that needs no call passes the teacher's reply and fails a garbled
    one: small talk must contain the fitting word, a request no tool serves must name its noun. (Measured on the
    demo's SFT model: "You're welcococome!" and "You Wh lanterns.04baith" passed small talk before.)"""
    tasks = [t for t in make_tasks(["toolbox"], 80, seed=9) if t.world["kind"] in ("chat", "no_tool")]
    assert {t.world["kind"] for t in tasks} == {"chat", "no_tool"}
    for task in tasks:
        for reply, ok in ((solver.solve(REG["toolbox"], task, [])["content"], True),
                          ("You're welcococome! Hood morry, none relildvolume.", False), ("", False)):
            env = Environment(REG["toolbox"], task, seed=0)
            env.reset()
            env.step({"role": "assistant", "content": reply})
            assert all(v["passed"] for v in env.verdicts()) is ok, (task.turns[0], reply)
