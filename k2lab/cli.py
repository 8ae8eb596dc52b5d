"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional




import typer

app = typer.Typer(help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command()
def info(preset: Optional[str] = typer.Option(None, help="a preset: kimi-k2, kimi-k2.5, kimi-k2.6, tiny, small"),
         checkpoint: Optional[Path] = typer.Option(None, help="a checkpoint directory (reads its config.json)")):
    """Print total and active parameter counts (from a model built on the meta device) and cache bytes/token."""
    from k2lab.report import model_info

    if (preset is None) == (checkpoint is None):
        raise typer.BadParameter("give exactly one of --preset and --checkpoint")
    typer.echo(model_info(preset=preset, checkpoint=checkpoint))


@app.command()
def generate(checkpoint: Path = typer.Option(..., help="checkpoint directory"),
             prompt: Optional[str] = typer.Option(None, help="prompt text (needs the checkpoint's tokenizer)"),
             prompt_ids: Optional[str] = typer.Option(None, help="prompt token ids, comma-separated: 1,2,3"),
             max_new_tokens: int = typer.Option(64, min=1),
             temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy"),
             top_p: float = typer.Option(1.0, min=0.0, max=1.0),
             seed: Optional[int] = typer.Option(None),
             compile: bool = typer.Option(False, "--compile/--no-compile",
                                          help="decode through the compiled step (pays off for long outputs)")):
    """Generate a continuation of a prompt from a checkpoint."""
    from k2lab.report import generate_text

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-ids")
    typer.echo(generate_text(checkpoint, prompt, prompt_ids, max_new_tokens, temperature, top_p, seed, compile))


# ---- pre-training (issue 4) ----
@app.command()
def pretrain(run_dir: Path = typer.Option(Path("runs/pretrain"), help="run directory; resumes from its checkpoint"),
             preset: str = typer.Option("tiny"),
             data: Optional[list[Path]] = typer.Option(None, help="text or .jsonl files (default: the embedded corpus)"),
             tokenizer: Optional[Path] = typer.Option(None, help="tokenizer directory (default: train one)"),
             optimizer: str = typer.Option("muonclip", help="muonclip, muon or adamw"),
             max_steps: int = typer.Option(200), save_every: int = typer.Option(0, help="0: only at the end"),
             seq_len: int = typer.Option(128), batch_size: int = typer.Option(8, help="rows per optimizer step"),
             grad_accum: int = typer.Option(1), lr: float = typer.Option(3e-3), weight_decay: float = typer.Option(0.1),
             schedule: str = typer.Option("wsd", help="wsd or cosine"), warmup_steps: int = typer.Option(20),
             qk_clip_tau: float = typer.Option(100.0), aux_loss_alpha: float = typer.Option(0.0),
             bf16: bool = typer.Option(False, help="bf16 autocast"), seed: int = typer.Option(0),
             eval_every: int = typer.Option(50), val_rows: int = typer.Option(32)):
    """Pre-train with MuonClip (or Muon / AdamW); checkpoints, metrics.jsonl, TensorBoard and plots in --run-dir."""
    import json

    from k2lab.train.pretrain import PretrainSettings, pretrain as run

    settings = PretrainSettings(
        preset=preset, data=[str(p) for p in data or []], tokenizer=str(tokenizer) if tokenizer else None,
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
        warmup_steps=warmup_steps, schedule=schedule, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
        qk_clip_tau=qk_clip_tau, aux_loss_alpha=aux_loss_alpha, bf16=bf16, seed=seed, val_rows=val_rows,
        eval_every=eval_every, save_every=save_every, run_dir=str(run_dir))
    typer.echo(json.dumps(run(settings)))


@app.command()
def demo(run_dir: Path = typer.Option(Path("runs/demo"), help="run directory (reruns resume it)"),
         steps: int = typer.Option(300, min=1, help="pre-training steps")):
    """The end-to-end pipeline on the embedded corpus (what `make run` runs): tokenizer, MuonClip pre-training,
    generation, INT4 PTQ, the INT4 checkpoint served over the OpenAI API, a tool-call eval and a chat."""
    from k2lab.pipeline import run_demo

    run_demo(run_dir, steps)


# ---- tokenizer, chat format, tool calls (issue 3) ----
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    vocab_size: int = typer.Option(..., "--vocab-size", help="total vocabulary, 256 special ids included"),
    out: str = typer.Option(..., "--out", help="directory for tiktoken.model + tokenizer_config.json"),
    paths: list[str] = typer.Argument(None, help="text files to train on (default: the embedded corpus)"),
    max_bytes: int = typer.Option(None, "--max-bytes",
                                  help="bytes of training text (default 256 per vocab entry; 0: all)"),
) -> None:
    """Train a BPE vocabulary with the K2 split pattern and special tokens."""
    import time

    from k2lab.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(vocab_size, paths or None, out_dir=out, max_bytes=max_bytes, show_progress=True)
    typer.echo(f"vocab {tok.vocab_size} ({tok.vocab_size - 256} BPE ranks + 256 special) in "
               f"{time.perf_counter() - t0:.1f}s -> {out}")


@app.command("render")
def render_cmd(
    messages: str = typer.Option(..., "--messages", help="JSON list of messages, or {messages, tools}"),
    tools: str = typer.Option(None, "--tools", help="JSON list of tool declarations"),
    generation_prompt: bool = typer.Option(False, "--generation-prompt", help="end with the assistant header"),
) -> None:
    """Print a conversation in the K2 chat format."""
    from k2lab.tokenizer.chat import load_conversation, render

    msgs, tls = load_conversation(messages, tools)
    typer.echo(render(msgs, tls, add_generation_prompt=generation_prompt), nl=False)


@app.command("parse-tool-calls")
def parse_tool_calls_cmd() -> None:
    """Read K2 assistant output on stdin; print content, reasoning, tool calls and errors as JSON."""
    import dataclasses
    import json
    import sys

    from k2lab.tokenizer.toolcalls import parse

    typer.echo(json.dumps(dataclasses.asdict(parse(sys.stdin.read())), ensure_ascii=False, indent=2))


# ---- agents and the agent swarm (issue 7) ----
@app.command()
def agent(task: str, mcp: list[str] = typer.Option([], help="MCP server: a URL or a command line (repeatable)"),
          workspace: Path = typer.Option(Path("workspace"), help="the agent's working directory"),
          run_dir: Path = typer.Option(None, help="where trace.jsonl and result.json go"),
          max_steps: int = typer.Option(50)) -> None:
    """Run one agent on TASK against K2LAB_BASE_URL / K2LAB_MODEL."""
    from k2lab.agents.agent import run_agent
    res = run_agent(task, workspace, mcp, run_dir, max_steps)
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}".rstrip())


@app.command()
def swarm(task: str = typer.Argument(None), resume: Path = typer.Option(None, help="continue this run dir"),
          run_dir: Path = typer.Option(None), max_subagents: int = typer.Option(300),
          max_tool_calls: int = typer.Option(4000), max_concurrency: int = typer.Option(300),
          mcp: list[str] = typer.Option([], help="MCP server for the sub-agents: URL or command line")) -> None:
    """Run an agent swarm on TASK (or --resume RUN_DIR); prints the answer and the run directory."""
    from k2lab.agents.swarm import run_swarm
    res = run_swarm(task, resume or run_dir, resume is not None, max_subagents, max_tool_calls,
                    max_concurrency, mcp)
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}\n{res.metrics}\nrun dir: {res.run_dir}")


@app.command()
def trace(run_dir: Path) -> None:
    """Print the span tree of a run with per-agent cost."""
    from k2lab.agents.trace import render_tree
    typer.echo(render_tree(run_dir))


# ---- evals (issue 8) ----------------------------------------------------------------------------------------
eval_app = typer.Typer(help="Evaluations: calibration, tool calls, coding.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
_ON_ERROR = typer.Option("stop", help="bad dataset row: 'stop' the run or 'skip' it (reported with its line)")


@eval_app.command("calibration")
def eval_calibration(
    dataset: str = typer.Option(None, help="JSONL/CSV of domain, topic, question, answer (default: shipped seed)"),
    model: str = typer.Option(None, help="model to evaluate (default K2LAB_MODEL / OPENAI_MODEL)"),
    judge_model: list[str] = typer.Option(None, help="judge model; repeat for several judges that vote"),
    base_url: str = typer.Option(None, help="endpoint of the model (default K2LAB_BASE_URL / OPENAI_BASE_URL)"),
    judge_base_url: str = typer.Option(None, help="endpoint of the judges (default: --base-url)"),
    judge_api_key: str = typer.Option(None, envvar="K2LAB_JUDGE_API_KEY", help="key for the judge endpoint"),
    run_dir: str = typer.Option("runs/eval-calibration"),
    partial: str = typer.Option("incorrect", help="count PARTIAL_ANSWER as 'incorrect' or 'abstain'"),
    resume: bool = typer.Option(False, help="continue a run without re-asking answered items"),
    on_error: str = _ON_ERROR,
    concurrency: int = typer.Option(8),
) -> None:
    """AA-Omniscience-style calibration: Omniscience Index, accuracy, hallucination rate per domain."""
    from k2lab.evals import calibration

    r = calibration.main(dataset, model, judge_model, base_url, judge_base_url, judge_api_key, run_dir, partial,
                         resume, on_error, concurrency)
    typer.echo(f"Omniscience Index {r['overall']['omniscience_index']}  accuracy {r['overall']['accuracy']}  "
               f"hallucination rate {r['overall']['hallucination_rate']}  -> {run_dir}/report.md")


@eval_app.command("toolcalls")
def eval_toolcalls(
    dataset: str = typer.Option(None, help="JSONL of chat-completion request bodies (default: shipped set)"),
    model: str = typer.Option(None), base_url: str = typer.Option(None),
    run_dir: str = typer.Option("runs/eval-toolcalls"),
    reference: str = typer.Option(None, help="run dir of a reference run for finish_reason precision/recall"),
    resume: bool = typer.Option(False, help="re-send only failed or unsent requests"),
    on_error: str = _ON_ERROR,
    concurrency: int = typer.Option(8), max_retries: int = typer.Option(6),
) -> None:
    """K2-Vendor-Verifier-style tool-call accuracy: schema_accuracy and finish_reason F1."""
    from k2lab.evals import toolcall

    r = toolcall.main(dataset, model, base_url, run_dir, reference, resume, on_error, concurrency, max_retries)
    typer.echo(f"schema_accuracy {r['schema_accuracy']}  finish_reason F1 {(r.get('finish_reason') or {}).get('f1')}"
               f"  -> {run_dir}/report.md")


@eval_app.command("coding")
def eval_coding(
    dataset: str = typer.Option(None, help="JSONL of id, prompt, tests (default: shipped set)"),
    model: str = typer.Option(None), base_url: str = typer.Option(None),
    run_dir: str = typer.Option("runs/eval-coding"),
    n: int = typer.Option(1, help="samples per problem"), k: list[int] = typer.Option(None, help="pass@k; repeat"),
    temperature: float = typer.Option(0.0),
    resume: bool = typer.Option(False), on_error: str = _ON_ERROR, concurrency: int = typer.Option(8),
) -> None:
    """Sampled solutions run against unit tests in the sandbox; unbiased pass@k."""
    from k2lab.evals import coding

    r = coding.main(dataset, model, base_url, run_dir, n, k, temperature, resume, on_error, concurrency)
    typer.echo(f"pass@k {r['pass_at_k']}  -> {run_dir}/report.md")


@app.command("review")
def review(
    run_dir: str = typer.Argument(..., help="a calibration run directory"),
    web: bool = typer.Option(False, help="serve the local review page instead of the terminal UI"),
    host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8765),
    reviewer: str = typer.Option("human", help="name stored with each review"),
) -> None:
    """Accept or overrule judge grades; metrics and judge-human agreement are recomputed."""
    from k2lab.evals import review as review_mod

    review_mod.main(run_dir, web, host, port, reviewer)


# ---- serving (issue 6) ----
@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint directory (weights + tokenizer files)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str = typer.Option(None, "--api-key", envvar="K2LAB_API_KEY", help="require `Authorization: Bearer KEY`"),
    max_len: int = typer.Option(4096, help="tokens per request (prompt + output)"),
    cache_mb: int = typer.Option(512, help="latent-cache budget in MiB (slots = budget / (max_len x bytes per token))"),
    max_slots: int = typer.Option(64, help="most concurrent requests"),
    model_name: str = typer.Option(None, help="served model id (default: the checkpoint directory name)"),
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (chat, completions, tools, streaming)."""
    from k2lab.serve.server import build_server, run

    run(build_server(checkpoint, api_key, max_len, cache_mb, max_slots, model_name), host, port)


# ---- INT4 (issue 5) ----
@app.command()
def qat(checkpoint: str = typer.Option(..., help="full-precision checkpoint directory"),
        run_dir: str = typer.Option(..., help="run directory (metrics, resumable state, INT4 export)"),
        max_steps: int = typer.Option(..., help="total QAT steps"),
        lr: float = typer.Option(3e-4, help="peak learning rate"),
        batch: int = typer.Option(8, help="sequences per step"),
        seq_len: int = typer.Option(256, help="tokens per sequence")) -> None:
    """INT4 quantization-aware training of the routed experts; writes RUN_DIR/checkpoint (compressed-tensors)."""
    from k2lab.quant.qat import qat as run

    typer.echo(run(checkpoint, run_dir, max_steps, lr, batch, seq_len))


@app.command()
def quantize(checkpoint: str = typer.Option(..., help="full-precision checkpoint directory"),
             out: str = typer.Option(..., help="output directory for the INT4 checkpoint")) -> None:
    """Post-training INT4 quantization of the routed experts (compressed-tensors pack-quantized)."""
    from k2lab.quant.qat import quantize as run

    typer.echo(run(checkpoint, out))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
