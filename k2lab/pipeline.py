"""`make run` / `k2lab demo`: the most complete end-to-end pipeline that exists, on the embedded corpus.

tokenizer + MuonClip pre-training (tiny) -> generation -> INT4 PTQ (compressed-tensors) -> the INT4 checkpoint
served by the OpenAI-compatible server -> the tool-call eval and one agent run against that endpoint
-> runs/<name>/report.md. Each stage calls the same function as its CLI command; a rerun with the same
--run-dir resumes pre-training and reuses finished stages.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch

PROMPT = "def fibonacci(n):\n"


def _stage(name: str, log: list, fn):
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    out = fn()
    log.append((name, time.perf_counter() - start))
    return out


def _quality(fp_dir: Path, int4_dir: Path, val_file: Path, new_tokens: int) -> dict:
    """Validation loss of both checkpoints and how long their greedy generations agree."""
    import k2lab
    from k2lab.model import MoE
    from k2lab.quant.checkpoint import has_int4_experts
    from k2lab.train.data import PackedRows
    from k2lab.train.loop import evaluate

    rows = PackedRows(val_file, seed=0).rows[:32]  # the held-out rows pre-training validates on
    fp, q = k2lab.load_model(fp_dir, dtype=torch.float32), k2lab.load_model(int4_dir)
    if not has_int4_experts(q):
        raise ValueError(f"{int4_dir} holds no INT4 experts")
    prompt = rows[:4, :16]
    with torch.no_grad():
        a, b = fp.generate(prompt, new_tokens)[:, 16:], q.generate(prompt, new_tokens)[:, 16:]
    same = (a == b).float()
    first_diff = [int((a[i] != b[i]).nonzero()[0]) if not bool(same[i].all()) else new_tokens for i in range(4)]

    def expert_bytes(model, bytes_per_value=None) -> int:  # bytes_per_value 2: as if stored in bf16
        tensors = [t for block in model.model.layers if isinstance(block.mlp, MoE)
                   for t in [*block.mlp.experts.parameters(), *block.mlp.experts.buffers()]]
        return sum(t.numel() * (bytes_per_value or t.element_size()) for t in tensors)

    return {"val_loss_full_precision": evaluate(fp, {"tokens": rows}, 8),
            "val_loss_int4": evaluate(q, {"tokens": rows}, 8),
            "greedy_agreement": same.mean().item(), "tokens_until_first_difference": first_diff,
            "expert_bytes_int4_over_bf16": expert_bytes(q) / expert_bytes(fp, 2)}


def _serve_and_evaluate(int4_dir: Path, run_dir: Path) -> dict:
    from k2lab.agents.llm import LLM
    from k2lab.evals.toolcall import ToolcallSettings, run_toolcalls
    from k2lab.serve.server import build_server, serve_in_thread

    server = build_server(int4_dir, max_len=1024, cache_mb=64, max_slots=16, model_name="k2lab-tiny-int4")
    with serve_in_thread(server) as base_url:
        print(f"serving {int4_dir} at {base_url}", flush=True)

        async def go() -> dict:
            llm = LLM(base_url=base_url, api_key="none", model="k2lab-tiny-int4", max_concurrency=8)
            try:
                eval_dir = run_dir / "eval_toolcalls"  # a rerun resumes it: only failed requests are re-sent
                # 256 new tokens: the server holds 1,024 per request and the longest shipped prompt is ~650
                results = await run_toolcalls(llm, ToolcallSettings(run_dir=str(eval_dir), resume=eval_dir.exists(),
                                                                    on_error="skip", max_tokens=256))
                chat = await llm.chat([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                      max_tokens=48, temperature=0.0)
                return {"toolcalls": results, "chat_reply": chat.message.get("content"), "usage": vars(llm.usage)}
            finally:
                await llm.aclose()
        return asyncio.run(go())


def run_demo(run_dir: str | Path = "runs/demo", steps: int = 300) -> Path:
    from k2lab.train.qat import quantize
    from k2lab.report import generate_text
    from k2lab.train.checkpoint import checkpoint_dirs
    from k2lab.train.loop import completed_steps
    from k2lab.train.metrics import read_metrics
    from k2lab.train.pretrain import PretrainSettings, pretrain

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []
    settings = PretrainSettings(preset="tiny", optimizer="muonclip", max_steps=steps, seq_len=256, batch_size=8,
                                warmup_steps=min(20, steps // 10), eval_every=50, save_every=100,
                                run_dir=str(run_dir / "pretrain"))
    if completed_steps(run_dir / "pretrain") >= steps:  # a rerun: reuse the finished run and its last record
        last = [r for r in read_metrics(run_dir / "pretrain") if "loss" in r][-1]
        print(f"== pre-training: reusing {run_dir / 'pretrain'} (finished at step {last['step']})")
    else:
        last = _stage("pre-train tiny with MuonClip (tokenizer trained first)", timings, lambda: pretrain(settings))
    checkpoint = checkpoint_dirs(run_dir / "pretrain")[-1]
    text = PROMPT + _stage("generate from the checkpoint", timings,
                           lambda: generate_text(checkpoint, PROMPT, None, 64))
    print(text)
    int4_dir = run_dir / "int4"
    _stage("INT4 PTQ -> compressed-tensors checkpoint", timings, lambda: quantize(checkpoint, int4_dir))
    quality = _stage("INT4 vs full precision", timings,
                     lambda: _quality(checkpoint, int4_dir, run_dir / "pretrain" / "data" / "val.npy", 128))
    print(json.dumps(quality, indent=1))
    served = _stage("serve INT4 + tool-call eval + chat through the OpenAI API", timings,
                    lambda: _serve_and_evaluate(int4_dir, run_dir))
    report = _report(run_dir, settings, last, checkpoint, text, quality, served, timings)
    print(f"\nreport: {report}\ncheckpoints: {checkpoint} (full precision), {int4_dir} (INT4)")
    return report


def _report(run_dir, settings, last, checkpoint, text, quality, served, timings) -> Path:
    tc = served["toolcalls"]
    plots = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "pretrain").rglob("*.png"))
    lines = [
        "# k2lab demo run", "",
        f"Pre-training: preset `{settings.preset}`, {settings.optimizer}, {settings.max_steps} steps of "
        f"{settings.batch_size}x{settings.seq_len} tokens on the embedded corpus (Python stdlib source).", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in last.items()
          if isinstance(v, (int, float, str))],
        "", "## INT4 (PTQ, routed experts, compressed-tensors pack-quantized)", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in quality.items()],
        "", "## Served INT4 checkpoint: tool-call eval (shipped request set) and a chat", "",
        f"{tc['answered']}/{tc['requests']} requests answered, {tc['tool_call_responses']} with tool calls, "
        f"schema_accuracy {tc['schema_accuracy']}, finish_reason F1 against the set's expectations "
        f"{(tc.get('finish_reason') or {}).get('f1')}; details in `eval_toolcalls/report.md`.", "",
        f"Chat reply: `{(served['chat_reply'] or '')[:200]!r}`", "",
        "## Generation from the full-precision checkpoint (greedy)", "", "```", text, "```", "",
        "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
        "## Time per stage", "", "| stage | seconds |", "|---|---:|",
        *[f"| {name} | {sec:.1f} |" for name, sec in timings],
        "", f"Checkpoint: `{checkpoint}`",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"pretrain": last, "int4": quality, "served": served,
                                                     "timings": dict(timings)}, indent=2, default=str))
    return path
