"""`k2lab serve` as a real process: SIGTERM lets the in-flight stream finish, refuses new work, then exits; a
request that would outlast the drain limit is aborted when it passes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import torch

from k2lab import save_model
from k2lab.model import K2ForCausalLM
from k2lab.tokenizer import train_tokenizer
from tests.serve_helpers import VOCAB, free_port, tiny_model_config


def wait_healthy(proc: subprocess.Popen, root: str) -> None:
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, "server did not start"
        time.sleep(0.2)


def test_sigterm_drains_in_flight_requests(tmp_path):
    tok = train_tokenizer(VOCAB, max_bytes=300_000)
    torch.manual_seed(0)
    save_model(K2ForCausalLM(tiny_model_config(tok)), tmp_path)  # random weights: rarely emits a stop token
    tok.save(tmp_path)
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "k2lab.cli", "serve", "--checkpoint", str(tmp_path),
                             "--port", str(port), "--max-len", "512", "--model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, root)
        body = {"model": "m", "prompt": "hello", "max_tokens": 300, "temperature": 0, "stream": True}
        after, last, prev = 0, None, None
        with httpx.stream("POST", f"{root}/v1/completions", json=body, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            for line in lines:
                after += 1
                prev, last = last, line
                if after == 5:  # draining: the listener is closed or the server answers 503
                    try:
                        refused = httpx.get(f"{root}/health", timeout=5).status_code == 503
                    except httpx.TransportError:
                        refused = True
                    assert refused
        assert last == "data: [DONE]" and after > 5
        assert json.loads(prev.removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the captured SIGTERM after its clean shutdown, so the status is -15 (or 0)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_with_a_stuck_request_exits_within_the_drain_limit(tmp_path):
    """A generation that would run for minutes (8,000 tokens, no stop): SIGTERM with --drain-timeout 2 waits 2 s,
    aborts it, and the process exits."""
    tok = train_tokenizer(VOCAB, max_bytes=300_000)
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_model_config(tok), max_position_embeddings=8192)
    save_model(K2ForCausalLM(config), tmp_path)
    tok.save(tmp_path)
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "k2lab.cli", "serve", "--checkpoint", str(tmp_path),
                             "--port", str(port), "--max-len", "8192", "--model-name", "m", "--drain-timeout", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, root)
        body = {"model": "m", "prompt": "hello", "max_tokens": 8000, "temperature": 0, "stream": True,
                "logit_bias": {str(tok.eos_id): -100, str(tok.im_end_id): -100}}
        lines = []
        with httpx.stream("POST", f"{root}/v1/completions", json=body, timeout=120) as r:
            it = r.iter_lines()
            lines.append(next(it))
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                lines.extend(it)
            except httpx.HTTPError:  # the server cut the stream
                pass
            code = proc.wait(30)
            took = time.monotonic() - signalled
        assert "data: [DONE]" not in lines  # the generation was aborted, not finished
        assert 2 <= took < 2 + 8, took  # the drain limit, plus shutting down
        assert code in (0, -signal.SIGTERM)
        assert "graceful shutdown exceeded" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
