"""k2lab: the Kimi K2.6 system in Python and PyTorch."""

from k2lab.config import ModelConfig

__all__ = ["ModelConfig", "load_model", "save_model"]
__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None, device_map=None):
    """Load a checkpoint directory (Hugging Face layout) as a K2ForCausalLM; see k2lab.checkpoint.load_model."""
    from k2lab.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype, device_map=device_map)


def save_model(model, path, max_shard_size="2GB", dtype=None):
    """Write a model as a Hugging Face checkpoint directory; see k2lab.checkpoint.save_model."""
    from k2lab.checkpoint import save_model as _save

    return _save(model, path, max_shard_size=max_shard_size, dtype=dtype)
