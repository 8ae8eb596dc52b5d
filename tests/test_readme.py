"""The README's command examples, run as written against a tiny run made here, so they stay true.

Every `k2lab ...` line of the README's code blocks and every inline `k2lab ...` example of its prose is collected;
optional `[...]` parts are dropped, placeholders (DIR, OUT, M, J, URL, PORT, runs/demo/int4, runs/s1, ...) are
replaced with a tiny checkpoint (random weights, a 1,024-id tokenizer trained here), its INT4 export and a
scripted OpenAI-compatible server (a test double for the model: the commands, not the model, are under test).
An example that is neither run nor listed in SKIPPED fails the test. The client snippet runs against a real
`k2lab serve` process; the vLLM / SGLang commands cannot run here (GPU), so only the paths they name are checked
against what `make run` writes.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

import k2lab
from k2lab.cli import app
from k2lab.testing.scripted_server import ScriptedServer
from tests.conftest import random_model
from tests.serve_helpers import free_port, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

SKIPPED = {  # command prefix -> why it does not run here (and what runs it instead)
    "k2lab demo": "`make run` itself: the whole recipe; tests/test_pipeline_recipe.py runs it on the reduced preset",
    "k2lab pretrain": "a training run; tests/test_pretrain.py runs it (resume, errors, determinism)",
    "k2lab qat": "a training run; tests/test_quant_qat.py runs it",
    "k2lab rl": "an RL run; tests/test_rl_run.py runs it (metrics, kill -9 resume, errors)",
    "k2lab sft": "a training run; tests/test_sft_cli.py runs it (end to end, kill -9 + resume, errors)",
    "k2lab tokenizer train": "trains on 2 MB of text (~10 s here); tests/test_tokenizer.py trains the same way",
    "k2lab swarm --resume": "needs a killed run; tests/test_swarm.py kills one (-9) and resumes it",
    "k2lab review": "interactive (a terminal UI, or a page served until Ctrl-C); tests/test_review*.py drive both",
    "k2lab synth": "tests/test_synth_cli.py and tests/test_synth_llm.py run it (embedded and LLM paths, kill -9 + resume)",
    "k2lab eval compare-graders": "needs a judged calibration run; tests/test_evals_rules.py makes one and runs it",
    "k2lab eval coding": "10 samples x 12 problems in the sandbox take minutes; tests/test_evals_cli.py runs it on one",
}


def readme_commands() -> list[str]:
    """`k2lab ...` lines of the code blocks (continuations joined, comments cut) and inline examples."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            if line.startswith("k2lab "):
                out.append(line)
    out += [c for c in re.findall(r"`(k2lab [^`]+)`", README) if " --" in c or " < " in c]  # not bare names
    return [" ".join(re.sub(r"\[[^\]]*\]|\w+\.\.\.", "", c).split()) for c in out]  # drop [optional] parts


def test_every_example_is_run_or_listed_as_skipped():
    runnable = ("--help", "--debug", "info", "generate", "render", "parse-tool-calls", "quantize", "agent", "swarm",
                "trace", "eval calibration", "eval toolcalls", "serve")
    for cmd in readme_commands():
        skipped = any(cmd.startswith(p) for p in SKIPPED)
        assert skipped or any(cmd.startswith(f"k2lab {r}") for r in runnable), f"README example not covered: {cmd}"


def test_readme_points_only_inside_the_repository():
    for target in re.findall(r"\]\(([^)]+)\)", README):  # markdown links and images
        assert not re.match(r"(/|~|\.\.|[a-z]+:)", target) and (ROOT / target).exists(), target
    for span in set(re.findall(r"`((?:k2lab|tests|bench|experiments|docs)/[^`\s]*)`", README)):
        path = span.split("::")[0]
        alt = re.search(r"\{([^}]*)\}", path)  # bench/results/model.{json,md}
        paths = [path.replace(alt.group(0), a) for a in alt.group(1).split(",")] if alt else [path]
        assert all(glob.glob(str(ROOT / p)) for p in paths), f"README names {span}, which is not in the repository"
    for outside in ("DESIGN.md", "REFERENCE.md", "/work/", "branch `"):
        assert outside not in README, f"README points outside the repository: {outside}"


def test_vllm_and_sglang_commands_use_paths_that_make_run_writes():
    """`make run` = `k2lab demo --run-dir runs/demo` with the default preset; the pipeline writes the pre-trained
    checkpoint as runs/demo/pretrain/checkpoints/step-NNNNNN and the INT4 one as runs/demo/int4."""
    from k2lab.pipeline import PRESETS

    steps = PRESETS["default"].pretrain_steps
    lines = [ln for ln in README.splitlines() if ln.startswith(("vllm serve", "python -m sglang"))]
    assert len(lines) == 2
    for line in lines:
        path = re.search(r"(runs/\S+)", line).group(1)
        assert path in (f"runs/demo/pretrain/checkpoints/step-{steps:06d}", "runs/demo/int4"), line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny checkpoint with a tokenizer (what DIR stands for) and its INT4 export (runs/demo/int4)."""
    from k2lab.train.qat import quantize
    from k2lab.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("readme")
    ckpt = root / "checkpoint"
    train_tokenizer(1024, out_dir=ckpt, max_bytes=300_000)
    tok = Tokenizer.load(ckpt)
    k2lab.save_model(random_model(tiny_model_config(tok)), ckpt)
    quantize(ckpt, root / "int4")
    return ckpt, root / "int4"


def scripted_model(req):
    """Plays the model for every README example that needs an endpoint."""
    if req.system.startswith("You are the orchestrator"):
        if req.step == 0:
            return {"tool_calls": [{"name": "create_subagent", "arguments": {"name": f"s{i}", "system_prompt":
                                                                             f"surveyor {i}"}} for i in range(2)]}
        if req.step == 1:
            return {"tool_calls": [{"name": "assign_task", "arguments": {"agent": f"s{i}", "prompt": f"part {i}"}}
                                   for i in range(2)]}
        return {"content": "survey: " + " | ".join(m["content"] for m in req.tool_results)}
    if req.system.startswith("surveyor"):
        return {"content": f"{req.user} surveyed"}
    if req.system.startswith("You answer") or req.system.startswith("You are answering"):
        return {"content": "I do not know."}
    if "Gold answer:" in req.user:  # a calibration judge
        return {"content": "The answer declines.\nD"}
    if "get_current_time" in req.tools:  # the agent with the MCP time server
        if req.step == 0:
            return {"tool_calls": [{"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}]}
        return {"content": "In Tokyo: " + req.tool_results[0]["content"]}
    return {"content": "no tool needed"}  # the tool-call eval's requests


def substitute(cmd: str, ckpt: Path, int4: Path, work: Path, url: str) -> list[str]:
    words = {"DIR": str(ckpt), "OUT": str(work / "out"), "runs/demo/int4": str(int4), "M": "m", "J": "judge",
             "M.json": str(work / "M.json"), "python": sys.executable}
    cmd = cmd.replace("http://127.0.0.1:PORT/v1", url)
    argv = []
    for w in shlex.split(cmd)[1:]:
        if w.startswith("python -m "):  # an MCP server command line
            w = w.replace("python", sys.executable, 1)
        argv.append(words.get(w, w))
    return argv


def test_readme_examples_run(tiny_run, tmp_path, monkeypatch):
    ckpt, int4 = tiny_run
    monkeypatch.chdir(tmp_path)  # relative run dirs (runs/s1, ws, runs/eval-*) land here
    (tmp_path / "M.json").write_text('[{"role": "user", "content": "hi"}]')
    (tmp_path / "out.txt").write_text('<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0'
                                      '<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>')
    ran = []
    with ScriptedServer(scripted_model) as srv:
        monkeypatch.setenv("K2LAB_BASE_URL", srv.base_url)
        monkeypatch.setenv("K2LAB_API_KEY", "k")
        monkeypatch.setenv("K2LAB_MODEL", "m")
        for cmd in readme_commands():
            if any(cmd.startswith(p) for p in SKIPPED) or cmd.startswith("k2lab serve"):
                continue
            stdin = None
            if " < " in cmd:
                cmd, src = cmd.split(" < ")
                stdin = (tmp_path / src).read_text()
            argv = substitute(cmd, ckpt, int4, tmp_path, srv.base_url)
            if "--mcp" in argv:  # a stdio MCP server needs real file descriptors, which CliRunner replaces
                p = subprocess.run([sys.executable, "-m", "k2lab.cli", *argv], capture_output=True, text=True,
                                   timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
                code, out, shown = p.returncode, p.stdout + p.stderr, p.stdout
            else:
                r = CliRunner().invoke(app, argv, input=stdin)
                code, out, shown = r.exit_code, r.output, r.stdout
            assert code == 0 and "Traceback" not in out, (cmd, out)
            check(cmd, shown)  # stdout: what the command prints (stderr may report, e.g. a compile's time)
            ran.append(cmd)
    assert len(ran) >= 12, ran


def check(cmd: str, out: str) -> None:
    """What each example promises beyond exit code 0."""
    if "--preset kimi-k2.6" in cmd:  # the numbers in the README's comment
        assert all(n in out for n in ("1,026,408,232,448", "32,861,500,928", "70,272")), out
    elif "--prompt-ids" in cmd:  # the ids, then the decoded text
        ids = out.splitlines()[0]
        assert re.fullmatch(r"\d+(,\d+)*", ids) and len(out.splitlines()) > 1, out
    elif cmd.startswith("k2lab quantize"):
        assert "INT4" in out and "bytes" in out, out
    elif cmd.startswith("k2lab render"):
        assert "<|im_user|>user<|im_middle|>hi<|im_end|>" in out, out
    elif cmd.startswith("k2lab parse-tool-calls"):
        assert '"name": "add"' in out, out
    elif cmd.startswith("k2lab agent"):  # the scripted model looks the time up only when asked about Tokyo
        assert ("In Tokyo:" in out or "Tokyo" not in cmd) and "outcome: completed" in out, out
    elif cmd.startswith("k2lab swarm"):
        assert "survey: part 0 surveyed | part 1 surveyed" in out or "part 0 surveyed" in out, out
    elif cmd.startswith("k2lab trace"):
        assert "agent orchestrator" in out, out
    elif cmd.startswith("k2lab eval"):
        assert "report.md" in out, out


def test_serve_and_the_client_snippet(tiny_run, tmp_path):
    """`k2lab serve` as the README writes it (on the tiny INT4 export), then the README's client snippet."""
    ckpt, int4 = tiny_run
    (serve,) = [c for c in readme_commands() if c.startswith("k2lab serve")]
    snippet = re.search(r"python - <<'PY'\n(.*?)\nPY\n", README, re.S).group(1)
    assert "max_tokens=" in snippet  # an untrained model would otherwise generate to the end of its context
    port = free_port()
    argv = substitute(serve, ckpt, int4, tmp_path, "").copy()
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "k2lab.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        code = snippet.replace("8000", str(port))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "role='assistant'" in out.stdout, out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
