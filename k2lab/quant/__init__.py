"""INT4 (W4A16, symmetric, group 32) for routed experts: the scheme, QAT, the released file format, INT4 compute."""
