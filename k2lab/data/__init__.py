"""Data: the embedded corpus, packing, synthetic task families with verifiers, image preprocessing."""
