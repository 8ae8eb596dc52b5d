"""Every user mistake of the first hour ends in one line naming the problem, a non-zero exit and no traceback;
`--debug` / `K2LAB_DEBUG=1` bring the traceback back. Commands run in-process through typer's CliRunner (the
same Group.invoke as `k2lab`), and two through a real `python -m k2lab.cli` process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from k2lab.cli import app
from k2lab.runs import claim
from k2lab.testing.scripted_server import ScriptedServer
from k2lab.testing.swarm_script import handler, plan

runner = CliRunner()
ENDPOINT_VARS = ("K2LAB_BASE_URL", "K2LAB_API_KEY", "K2LAB_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL")


def fails(args: list[str], *names: str, code: int = 1) -> str:
    """Run `k2lab ARGS`; it must exit with `code` through the CLI (not an escaped exception), print no traceback,
    and name every one of `names`. Returns the output."""
    r = runner.invoke(app, [str(a) for a in args])
    assert isinstance(r.exception, SystemExit) and r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    for name in names:
        assert str(name) in r.output, (name, r.output)
    if code == 1:  # a user error is one line
        assert len([ln for ln in r.output.splitlines() if ln.startswith("error: ")]) == 1, r.output
    return r.output


@pytest.fixture
def no_endpoint(monkeypatch):
    for k in ENDPOINT_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unknown_preset():
    fails(["info", "--preset", "kimi-k9"], "unknown preset 'kimi-k9'", "kimi-k2.6")


def test_missing_checkpoint_directory(tmp_path):
    missing = tmp_path / "no-such-run"
    fails(["info", "--checkpoint", missing], missing)
    fails(["generate", "--checkpoint", missing, "--prompt-ids", "1,2"], missing)
    fails(["quantize", "--checkpoint", missing, "--out", tmp_path / "q"], missing)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    fails(["generate", "--checkpoint", tmp_path, "--prompt-ids", "1,2"], tmp_path, "config.json")
    fails(["quantize", "--checkpoint", tmp_path, "--out", tmp_path / "q"], tmp_path, "config.json")
    (tmp_path / "config.json").write_text("{not json")
    fails(["info", "--checkpoint", tmp_path], tmp_path / "config.json", "not valid JSON")


def test_file_that_is_not_json_or_jsonl(tmp_path, no_endpoint):
    bad = tmp_path / "conversation.json"
    bad.write_text("[{'role': 'user'}]")
    fails(["render", "--messages", bad], bad, "not valid JSON")
    fails(["render", "--messages", '[{"role": "user", "content": "hi"'], "--messages", "not valid JSON")
    fails(["render", "--messages", tmp_path / "missing.json"], "missing.json")
    fails(["render", "--messages", '[{"role": "user", "content": 5}]'], "--messages", "content must be")
    rows = tmp_path / "requests.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n')
    fails(["eval", "toolcalls", "--dataset", rows, "--base-url", "http://127.0.0.1:1/v1", "--model", "m",
           "--run-dir", tmp_path / "run"], f"{rows}:2", "not valid JSON")


def test_run_directory_with_other_settings(tmp_path):
    run_dir = tmp_path / "run"
    claim(run_dir, {"model": "model-a"}, "eval-toolcalls")  # what a toolcalls run of model-a leaves behind
    fails(["eval", "toolcalls", "--resume", "--base-url", "http://127.0.0.1:1/v1", "--model", "model-b",
           "--run-dir", run_dir], run_dir, "'model-a' there, 'model-b' now")
    claim(tmp_path / "pre", {"preset": "tiny"}, "pretrain")
    fails(["eval", "toolcalls", "--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--run-dir", tmp_path / "pre"],
          tmp_path / "pre", "pretrain run")


def test_finished_run_given_again(tmp_path, monkeypatch):
    run_dir = tmp_path / "swarm"
    with ScriptedServer(handler(plan(2, 10))) as srv:
        monkeypatch.setenv("K2LAB_API_KEY", "k")
        endpoint = ["--base-url", srv.base_url, "--model", "m"]
        done = runner.invoke(app, ["swarm", "sum all entries", "--run-dir", str(run_dir), *endpoint])
        assert done.exit_code == 0, done.output
        fails(["swarm", "--resume", run_dir, *endpoint], run_dir, "finished", "result.json")
        fails(["swarm", "sum all entries", "--run-dir", run_dir, *endpoint], run_dir, "--resume")
    assert json.loads((run_dir / "result.json").read_text())["outcome"] == "completed"


def test_empty_task(no_endpoint):
    fails(["agent", "  "], "task is empty", code=2)
    fails(["swarm", ""], "task is empty", code=2)


def test_missing_corpus_file(tmp_path):
    missing = tmp_path / "corpus.txt"
    fails(["tokenizer", "train", "--vocab-size", "1024", "--out", tmp_path / "tok", missing], missing)
    fails(["pretrain", "--data", missing, "--run-dir", tmp_path / "run", "--max-steps", "100"], missing)


def test_out_of_range_numbers(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    fails(["tokenizer", "train", "--vocab-size", "10", "--out", tmp_path / "tok", corpus], "vocab_size 10 too small")
    assert not (tmp_path / "tok").exists()
    fails(["serve", "--checkpoint", tmp_path, "--port", "99999"], "--port", code=2)  # before any model loads


def test_no_endpoint_configured(tmp_path, no_endpoint):
    fails(["agent", "hello", "--workspace", tmp_path], "no model endpoint configured", "--base-url",
          "K2LAB_BASE_URL")
    fails(["eval", "coding", "--model", "m", "--run-dir", tmp_path / "run"], "no model endpoint configured")
    # no model named: the endpoint is asked for its only one, and nothing answers there
    fails(["swarm", "hello", "--base-url", "http://127.0.0.1:1/v1"], "cannot reach the model endpoint",
          "connection refused", "k2lab serve")


def test_unreachable_endpoint_fails_fast(tmp_path, closed_port, no_endpoint):
    url = f"http://127.0.0.1:{closed_port}/v1"
    t0 = time.perf_counter()
    fails(["agent", "hello", "--base-url", url, "--model", "m", "--workspace", tmp_path / "ws",
           "--run-dir", tmp_path / "a"], url, "connection refused")
    fails(["swarm", "hello", "--base-url", url, "--model", "m", "--run-dir", tmp_path / "s"], url,
          "connection refused")
    fails(["eval", "toolcalls", "--base-url", url, "--model", "m", "--run-dir", tmp_path / "e"], url,
          "connection refused")
    assert time.perf_counter() - t0 < 10  # not retried with backoff (that took 12 s and more per command)


def test_mcp_command_that_cannot_start(tmp_path, closed_port, no_endpoint):
    endpoint = ["--base-url", f"http://127.0.0.1:{closed_port}/v1", "--model", "m"]
    fails(["agent", "hello", "--mcp", "no-such-mcp-server --stdio", "--workspace", tmp_path, *endpoint],
          "'no-such-mcp-server --stdio'", "could not be started")
    fails(["agent", "hello", "--mcp", f"{sys.executable} -c 'raise SystemExit(3)'", "--workspace", tmp_path,
           "--run-dir", tmp_path / "run", *endpoint], "could not be started")
    assert not (tmp_path / "run").exists()  # nothing ran, so no run directory is left behind


def test_debug_shows_the_traceback():
    r = runner.invoke(app, ["--debug", "info", "--preset", "kimi-k9"])
    assert r.exit_code == 1 and type(r.exception).__name__ == "ConfigError"  # raised, not turned into a line
    env = {**os.environ, "K2LAB_DEBUG": "1"}
    cmd = [sys.executable, "-m", "k2lab.cli", "info", "--preset", "kimi-k9"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "unknown preset 'kimi-k9'" in p.stderr
    env.pop("K2LAB_DEBUG")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: unknown preset 'kimi-k9'; choose one of kimi-k2, kimi-k2.5, "
                                             "kimi-k2.6, tiny, small"]


def test_a_bug_keeps_its_traceback():
    """Only the user-error types become one line; anything else is a bug and must stay visible."""
    import typer

    from k2lab.cli import Group
    from k2lab.runs import RunDirError

    demo = typer.Typer(cls=Group)

    @demo.command()
    def bug():
        raise KeyError("an internal slip")

    @demo.command()
    def mistake():
        raise RunDirError("runs/x holds another run; use another --run-dir")

    r = runner.invoke(demo, ["bug"])
    assert isinstance(r.exception, KeyError)
    r = runner.invoke(demo, ["mistake"])
    assert r.exit_code == 1 and r.output == "error: runs/x holds another run; use another --run-dir\n"


def test_help_has_no_type_labels():
    """Every command's --help reads `--port N` / `TASK  what...`, never typer's `<int>` or `<str>`."""
    import re

    import typer.main

    group = typer.main.get_command(app)
    names = [[n] for n in group.commands if n not in ("tokenizer", "eval")]
    names += [["tokenizer", "train"]] + [["eval", n] for n in ("calibration", "toolcalls", "coding")]
    for name in names:
        out = CliRunner().invoke(app, [*name, "--help"]).output
        label = re.search(r"\s<(int|str|float|path|bool|list|float range|int range)[^>]*>", out)
        assert "Usage:" in out and not label, (name, out)


def test_a_setting_added_later_keeps_older_runs_resumable(tmp_path):
    """A run directory written before RLSettings had --thinking / --calibration-reward is the same run as one
    with those settings at the values that behave as before, and a different run otherwise."""
    import dataclasses

    from k2lab.config import ModelConfig
    from k2lab.runs import RunDirError
    from k2lab.train.settings import RLSettings

    config = ModelConfig.preset("tiny")
    s = RLSettings(checkpoint="ckpt")
    old = {k: v for k, v in s.identity(config).items() if k not in RLSettings.ADDED}  # what an older run wrote
    claim(tmp_path / "rl", old, "rl")
    assert claim(tmp_path / "rl", s.identity(config), "rl", added=s.ADDED) == tmp_path / "rl"
    brier = dataclasses.replace(s, calibration_reward="brier")
    with pytest.raises(RunDirError, match="calibration_reward: 'ternary' there, 'brier' now"):
        claim(tmp_path / "rl", brier.identity(config), "rl", added=s.ADDED)
    with pytest.raises(RunDirError, match="thinking"):  # without `added`, an older run is another run
        claim(tmp_path / "rl", s.identity(config), "rl")
