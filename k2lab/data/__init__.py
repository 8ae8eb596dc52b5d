"""Data for k2lab: image preprocessing for the multimodal model."""
