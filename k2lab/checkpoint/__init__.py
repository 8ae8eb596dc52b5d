"""Checkpoints in the Hugging Face layout of the released K2 weights."""

from k2lab.checkpoint.hf import CheckpointError, load_model, save_model, state_dict_to_hf

__all__ = ["CheckpointError", "load_model", "save_model", "state_dict_to_hf"]
