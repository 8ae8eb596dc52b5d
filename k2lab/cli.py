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
             seed: Optional[int] = typer.Option(None)):
    """Generate a continuation of a prompt from a checkpoint."""
    from k2lab.report import generate_text

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-ids")
    typer.echo(generate_text(checkpoint, prompt, prompt_ids, max_new_tokens, temperature, top_p, seed))


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
