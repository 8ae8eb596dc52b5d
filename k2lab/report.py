"""What the `info`, `generate` and `quantize` commands print: model sizes from a meta-device build, generated text,
and what quantization did."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from k2lab.checkpoint import CheckpointError
from k2lab.config import ModelConfig


def model_info(preset: str | None = None, checkpoint: str | Path | None = None) -> str:
    from k2lab.model import K2ForCausalLM, parameter_counts
    from k2lab.model.vision import vision_param_counts

    config = ModelConfig.preset(preset) if preset else ModelConfig.load(checkpoint)
    with torch.device("meta"):
        counts = parameter_counts(K2ForCausalLM(config))
    name = preset or str(checkpoint)
    rows = [
        ("model", name),
        ("total parameters", f"{counts['total']:,}"),
        ("active parameters per token", f"{counts['active']:,}"),
        ("embedding / lm_head", f"{counts['embedding']:,} / {counts['lm_head']:,}"),
        ("layers (dense + MoE)", f"{config.num_hidden_layers} ({config.first_k_dense_replace} + "
                                 f"{config.num_hidden_layers - config.first_k_dense_replace})"),
        ("experts", f"{config.n_routed_experts} routed, {config.num_experts_per_tok} per token, "
                    f"{config.n_shared_experts} shared"),
        ("KV cache bytes per token (bf16)", f"{config.cache_bytes_per_token(2):,}"),
        ("context", f"{config.max_position_embeddings:,}"),
    ]
    vision = vision_param_counts(preset if preset else config)
    if vision:
        rows += [("vision encoder (MoonViT) parameters", f"{vision['vision_encoder']:,}"),
                 ("vision projector parameters", f"{vision['projector']:,}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def generate_text(checkpoint: str | Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  compile: bool = False) -> str:
    """The continuation's text; for `prompt_ids`, its ids on the first line, then the text when the checkpoint
    has a tokenizer."""
    import k2lab
    from k2lab.tokenizer import Tokenizer

    model = k2lab.load_model(checkpoint, dtype=torch.float32, text_only=True)
    tokenizer = Tokenizer.load(checkpoint) if (Path(checkpoint) / "tiktoken.model").exists() else None
    if prompt is not None:
        if tokenizer is None:
            raise CheckpointError(f"{checkpoint} has no tiktoken.model; pass --prompt-ids instead of --prompt")
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    if not ids or not all(0 <= i < model.config.vocab_size for i in ids):
        raise typer.BadParameter(f"prompt ids must be non-empty and in [0, {model.config.vocab_size})")
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_p, seed,
                         eos_token_id=model.config.eos_token_id, compile=compile)[0, len(ids):].tolist()
    if prompt is not None:
        return tokenizer.decode(out)
    return ",".join(map(str, out)) + (f"\n{tokenizer.decode(out)}" if tokenizer else "")


def quantize_summary(checkpoint: str | Path, out: str | Path) -> str:
    """`k2lab quantize`: PTQ of the routed experts, then what was written and how big it is against the input."""
    from k2lab.train.qat import quantize

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))

    quantize(checkpoint, out)
    before, after = size(checkpoint), size(out)
    return (f"INT4 routed experts (compressed-tensors pack-quantized, group 32) -> {out}\n"
            f"weights {before:,} -> {after:,} bytes ({after / before:.2f}x of {checkpoint})")
