"""k2lab: the Kimi K2.6 system in Python and PyTorch."""

from k2lab.config import ModelConfig

__all__ = ["ModelConfig", "load_model", "save_model"]
__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None, device_map=None, text_only=False):
    """Load a checkpoint directory (Hugging Face layout) as what it holds: the multimodal K2.5/K2.6 model when
    config.json has a vision_config (the language model alone with `text_only=True`), else K2ForCausalLM; INT4
    experts stay INT4. See k2lab.checkpoint.load_model."""
    import k2lab.quant  # noqa: F401  (registers the INT4 experts codec)
    from k2lab.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype, device_map=device_map, text_only=text_only)


def save_model(model, path, max_shard_size="2GB", dtype=None):
    """Write a k2lab model (text or multimodal, INT4 experts included) as a Hugging Face checkpoint directory;
    see k2lab.checkpoint.save_model."""
    import k2lab.quant  # noqa: F401  (registers the INT4 experts codec)
    from k2lab.checkpoint import save_model as _save

    return _save(model, path, max_shard_size=max_shard_size, dtype=dtype)
