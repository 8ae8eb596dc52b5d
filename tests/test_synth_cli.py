"""`k2lab synth` on the embedded domains: output format, round trips, schemas, bad input, kill -9 and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jsonschema

from k2lab.runs import read_jsonl
from k2lab.tokenizer.chat import render
from k2lab.tokenizer.toolcalls import parse
from tests.conftest import side_by_side

CLI = [sys.executable, "-m", "k2lab.cli", "synth"]


def synth(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300, **kw)


def test_output_renders_parses_back_and_validates(tmp_path):
    out = tmp_path / "run"
    r = synth("--tasks", "100", "--out", str(out))
    assert r.returncode == 0, r.stderr
    kept, rejected = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert len(kept) + len(rejected) == 100 and len(kept) >= 90
    assert {r["domain"] for r in kept} == {"arithmetic", "store", "files", "lookup", "knowledge", "toolbox"}
    for rec in kept:
        assert set(rec) >= {"messages", "tools", "rubric", "verdicts", "domain", "task_id"}
        assert rec["verdicts"] and all(v["passed"] for v in rec["verdicts"]) and rec["teacher"] == "rule-based solver"
        text = render(rec["messages"], rec["tools"] or None)
        bodies = re.findall(r"<\|im_assistant\|>assistant<\|im_middle\|>(.*?)<\|im_end\|>", text, re.S)
        sent = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert len(bodies) == len(sent)
        for body, m in zip(bodies, sent):
            back = parse(body).to_message()
            assert (back["content"] or "") == (m["content"] or "")
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in back.get("tool_calls", [])] \
                == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in rec["tools"]}
        for m in sent:
            for c in m.get("tool_calls") or []:
                jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])
    for rec in rejected:
        assert rec["reasons"] and not rec["accepted"]
    card = json.loads((out / "card.json").read_text())
    assert card["totals"]["kept"] == len(kept) and (out / "card.md").exists() and (out / "tool_map.png").exists()
    assert sum(d["trajectories"] for d in card["per_domain"].values()) == 100


def test_bad_input_gets_a_short_message(tmp_path):
    b = str(tmp_path / "b")
    # side by side: each command is mostly the interpreter's start
    bad, made = side_by_side([CLI + ["--domains", "cooking", "--tasks", "5", "--out", str(tmp_path / "a")],
                              CLI + ["--tasks", "3", "--out", b]])
    assert bad.returncode == 2 and "cooking" in bad.stderr and "Traceback" not in bad.stderr
    assert made.returncode == 0
    again, other = side_by_side([CLI + ["--tasks", "3", "--out", b], CLI + ["--tasks", "4", "--out", b, "--resume"]])
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    assert other.returncode == 2 and "other settings" in other.stderr


def test_kill_then_resume_loses_and_repeats_nothing(tmp_path):
    n = 800
    out, ref = tmp_path / "killed", tmp_path / "ref"
    (tmp_path / "tmp").mkdir()  # a killed run cannot remove its episode's workspace: keep it inside tmp_path
    proc = subprocess.Popen(CLI + ["--tasks", str(n), "--out", str(out), "--fault-rate", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "kept.jsonl").exists() and (out / "kept.jsonl").stat().st_size > 30_000:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [r["task_id"] for f in ("kept.jsonl", "rejected.jsonl") for r in read_jsonl(out / f)]
    assert 0 < len(before) < n, "the run must be killed part-way"
    assert synth("--tasks", str(n), "--out", str(out), "--fault-rate", "0.3", "--resume").returncode == 0
    assert synth("--tasks", str(n), "--out", str(ref), "--fault-rate", "0.3").returncode == 0
    for name in ("kept.jsonl", "rejected.jsonl"):
        got, want = read_jsonl(out / name), read_jsonl(ref / name)
        ids = [r["task_id"] for r in got]
        assert len(ids) == len(set(ids))  # nothing repeated
        assert sorted(ids) == sorted(r["task_id"] for r in want)  # nothing lost
        by_id = {r["task_id"]: r for r in want}
        assert all(r == by_id[r["task_id"]] for r in got)  # the resumed records are what a clean run writes


def test_embedded_domains_with_a_model_as_teacher(tmp_path):
    """The embedded environments driven over the OpenAI API (how a trained model's task success is measured).
    The scripted server is a test double for the model: it answers what the rule-based solver would, except
    that it truncates its reply on every fifth task."""
    from k2lab.synth import solver
    from k2lab.synth.checks import roundtrip_errors
    from k2lab.synth.domains import EMBEDDED, make_tasks, registry
    from k2lab.testing.scripted_server import ScriptedServer

    reg, tasks = registry(), make_tasks(list(EMBEDDED), 20, seed=0)
    by_prompt = {t.turns[0]: (i, t) for i, t in enumerate(tasks)}

    def model(req):
        i, task = by_prompt[req.user]
        if i % 5 == 4:
            return {"content": "Let me think about", "finish_reason": "length"}
        msg = solver.solve(reg[task.domain], task, req.messages)
        return {"content": msg["content"], "tool_calls": [
            {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]} for tc in msg.get("tool_calls") or []]}

    out = tmp_path / "run"
    with ScriptedServer(model) as srv:
        env = {**os.environ, "K2LAB_BASE_URL": srv.base_url, "K2LAB_API_KEY": "k", "K2LAB_MODEL": "scripted"}
        r = subprocess.run(CLI + ["--tasks", "20", "--out", str(out), "--teacher", "llm", "--fault-rate", "0.1"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    kept, rejected = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert len(kept) + len(rejected) == 20 and {x["teacher"] for x in kept} == {"scripted"}
    truncated = {t.task_id for i, t in enumerate(tasks) if i % 5 == 4}
    assert {x["task_id"] for x in rejected} >= truncated
    assert all(any("Truncated" in why for why in x["reasons"]) for x in rejected if x["task_id"] in truncated)
    assert len(kept) >= 14
    for x in kept:  # the endpoint's call_... ids were rewritten to K2's functions.NAME:INDEX
        assert roundtrip_errors(x["messages"], x["tools"]) == []
        assert all(tc["id"].startswith("functions.") for m in x["messages"] for tc in m.get("tool_calls") or [])


def test_a_run_without_tools_writes_its_card_quietly(tmp_path):
    # knowledge questions only: no tool to map, and the tool-map plot says so instead of warning about its legend
    out = tmp_path / "know"
    r = synth("--domains", "knowledge", "--tasks", "6", "--out", str(out))
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
    assert (out / "tool_map.png").stat().st_size > 0 and len(read_jsonl(out / "kept.jsonl")) == 6
