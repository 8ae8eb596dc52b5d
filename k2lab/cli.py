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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
