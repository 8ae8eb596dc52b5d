"""Data: the embedded corpus, packing, synthetic task families with verifiers, image preprocessing."""


class DatasetError(ValueError):
    """A data file that cannot be used: missing, not JSON / JSONL, or a malformed row; the message names the file
    (and the line)."""
