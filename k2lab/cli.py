"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage."""

from __future__ import annotations

import typer

app = typer.Typer(help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


# ---- tokenizer, chat format, tool calls (issue 3) ----
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    vocab_size: int = typer.Option(..., "--vocab-size", help="total vocabulary, 256 special ids included"),
    out: str = typer.Option(..., "--out", help="directory for tiktoken.model + tokenizer_config.json"),
    paths: list[str] = typer.Argument(None, help="text files to train on (default: the embedded corpus)"),
    max_bytes: int = typer.Option(None, "--max-bytes", help="bytes of training text (default 2 MB; 0: all)"),
) -> None:
    """Train a BPE vocabulary with the K2 split pattern and special tokens."""
    import time

    from k2lab.tokenizer import train_tokenizer

    kw = {} if max_bytes is None else {"max_bytes": max_bytes or None}
    t0 = time.perf_counter()
    tok = train_tokenizer(vocab_size, paths or None, out_dir=out, show_progress=True, **kw)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
