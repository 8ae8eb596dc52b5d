"""k2lab: the Kimi K2.6 system in Python and PyTorch."""

from k2lab.config import ModelConfig

__all__ = ["ModelConfig"]
__version__ = "0.1.0"
