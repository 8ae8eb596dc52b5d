"""INT4 (W4A16, symmetric, group 32) for routed experts: the scheme, QAT, the released file format, INT4 compute.

Importing this package registers the pack-quantized experts codec with k2lab.checkpoint.
"""

from k2lab.quant import checkpoint  # noqa: F401  (registers the codec)
