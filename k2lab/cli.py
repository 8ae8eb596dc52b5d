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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
