"""Does the tiny K2 form content-addressed copying (an induction circuit), and does the optimizer decide when?

A minimal loop, apart from the trainer: the `tiny` preset (tied head) learns rows made of random spans, each
read twice, of 4-16 tokens drawn from an alphabet of 64 ordinary tokens. Only a model that finds the earlier
reading of its current token and copies what followed it predicts a second reading; the spans' lengths vary,
so no fixed look-back fits. Every `--every` steps it prints the training loss (about ln 64 = 4.16 nats without
copying, about 2.1 with perfect copying) and the copying probe (k2lab.evals.copying) on random spans read twice
(top-1 on the second reading): of 16 and 40 tokens from the alphabet, and of 16 tokens from the whole vocabulary
("vocab16": tokens it never saw).

    python experiments/induction_plateau.py --optimizer muon    # about 30 min on 1 CPU thread for 1500 steps
    python experiments/induction_plateau.py --optimizer adamw

A curriculum: give several alphabets (`--alphabet 64 512 7636`) and the rows move to the next, larger one as soon
as the 16-token spans of the current one are copied at `--widen-at` (the probes follow the current alphabet).
Does a circuit formed on a few tokens widen to the whole vocabulary faster than it forms there from scratch?

Prints the curve; nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon",
                    help="muon: k2lab's Muon on the matrices, AdamW on the rest; adamw: AdamW on all")
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (20 warm-up steps, then constant)")
    ap.add_argument("--alphabet", type=int, nargs="+", default=[64], metavar="N",
                    help="how many distinct tokens the spans draw from; several sizes make a widening curriculum")
    ap.add_argument("--zipf", type=float, default=0.0, metavar="S",
                    help="draw the alphabet's tokens with probability ~ 1 / rank^S (rank: a fixed shuffle of the "
                         "alphabet), as natural text's tokens are; 0: uniformly")
    ap.add_argument("--widen-at", type=float, default=0.9,
                    help="move to the next alphabet once this share of the current one's 16-token spans is copied")
    ap.add_argument("--span", type=int, nargs=2, default=(4, 16), metavar=("MIN", "MAX"), help="span lengths")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per training row")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per step")
    ap.add_argument("--every", type=int, default=50, help="print every this many steps")
    ap.add_argument("--seed", type=int, default=0, help="model initialization and data")
    ap.add_argument("--kv-lora-rank", type=int, default=None,
                    help="the latent's width (keys and values of every head pass through it; tiny: 64)")
    a = ap.parse_args()
    if min(a.steps, a.every, a.batch_size) < 1 or a.seq_len < 2 or a.lr <= 0:
        sys.exit("error: give --steps, --every and --batch-size >= 1, --seq-len >= 2 and --lr > 0")
    from k2lab.config import ModelConfig  # light imports: no torch yet
    from k2lab.tokenizer.tokenizer import NUM_RESERVED

    config = ModelConfig.preset("tiny")
    first = 300  # ordinary tokens of any tiny vocabulary
    whole = config.vocab_size - NUM_RESERVED - first  # its ordinary tokens from `first` on
    if not all(2 <= n <= whole for n in a.alphabet) or a.alphabet != sorted(set(a.alphabet)):
        sys.exit(f"error: give --alphabet sizes from 2 to {whole} (the whole vocabulary) in increasing order")
    if not 1 <= a.span[0] <= a.span[1]:
        sys.exit("error: give 1 <= --span MIN <= MAX")
    if a.kv_lora_rank is not None and a.kv_lora_rank < 1:
        sys.exit("error: give --kv-lora-rank >= 1")
    if a.zipf < 0:
        sys.exit("error: give --zipf >= 0")
    if not 0 < a.widen_at <= 1:
        sys.exit("error: give 0 < --widen-at <= 1")

    import numpy as np
    import torch

    from k2lab.evals.copying import copy_probe
    from k2lab.model.transformer import K2ForCausalLM
    from k2lab.optim.muon import build_optimizer

    config.tie_word_embeddings = True
    config.kv_lora_rank = a.kv_lora_rank or config.kv_lora_rank
    torch.manual_seed(a.seed)
    model = K2ForCausalLM(config)
    rng = np.random.default_rng(a.seed)
    stage = 0  # index into a.alphabet
    order = np.random.default_rng([a.seed, 1]).permutation(max(a.alphabet))  # token of each frequency rank

    @functools.cache
    def ranked(n: int) -> tuple[np.ndarray, np.ndarray]:  # the alphabet of size n by rank, and its probabilities
        w = 1.0 / np.arange(1, n + 1) ** a.zipf
        return first + order[order < n], w / w.sum()

    def draw(r: np.random.Generator, n: int, shape) -> np.ndarray:  # tokens of the alphabet of size n
        if not a.zipf:
            return r.integers(first, first + n, shape)
        tokens, p = ranked(n)
        return tokens[r.choice(n, size=shape, p=p)]

    def batch() -> torch.Tensor:
        out = np.empty((a.batch_size, a.seq_len + 1), dtype=np.int64)
        for i in range(a.batch_size):
            toks: list[int] = []
            while len(toks) < a.seq_len + 1:
                n = int(rng.integers(a.span[0], a.span[1] + 1))
                span = draw(rng, a.alphabet[stage], n).tolist()
                toks += span + span
            out[i] = toks[: a.seq_len + 1]
        return torch.from_numpy(out)

    opt = build_optimizer(model, a.optimizer, lr=a.lr, weight_decay=0.0)
    def alphabet_probes(r: np.random.Generator) -> dict:  # spans of 16 and 40 from the current alphabet
        return {n: torch.from_numpy(draw(r, a.alphabet[stage], (16, n))) for n in (16, 40)}

    probe_rng = np.random.default_rng(123)
    probes = alphabet_probes(probe_rng)
    # spans of 16 over the whole vocabulary's ordinary tokens: does what formed work on tokens it never copied?
    probes["vocab16"] = torch.from_numpy(probe_rng.integers(first, config.vocab_size - NUM_RESERVED, (16, 16)))
    start = time.time()
    for step in range(1, a.steps + 1):
        x = batch()
        for g in opt.param_groups:  # 20 warm-up steps, then constant
            g["lr"] = g["base_lr"] * min(1.0, step / 20)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == 1:
            with torch.no_grad():
                copied = {n: round(copy_probe(model, p, p.shape[1])["repeat_top1"], 3) for n, p in probes.items()}
            model.train()
            print(f"step {step} alphabet {a.alphabet[stage]} loss {loss.item():.3f} copied (span: top-1) {copied} "
                  f"{time.time() - start:.0f}s", flush=True)
            if copied[16] >= a.widen_at and stage + 1 < len(a.alphabet):
                stage += 1
                probes.update(alphabet_probes(np.random.default_rng(123)))
                print(f"step {step}: widening to an alphabet of {a.alphabet[stage]}", flush=True)


if __name__ == "__main__":
    main()
