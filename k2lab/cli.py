"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage."""

from __future__ import annotations

import typer

app = typer.Typer(help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


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
