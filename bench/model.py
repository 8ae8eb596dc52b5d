"""k2lab vs transformers on the same config and weights, on this machine: training step, prefill and decode
throughput, and cache bytes per token. Runs alternate between the two implementations (so load from elsewhere hits both alike) and report medians.
Also the cost of determinism: k2lab's training step with its deterministic MoE combine (permutations plus a sum
over the k choices) against the scatter-add (index_add_) combine it replaced, and whether each gives bitwise
identical gradients when a step is repeated at the default thread count.

    python bench/model.py [--preset tiny] [--repeats 5] [--quick] [--determinism-only]

Writes bench/results/model.json and bench/results/model.md (the table the README shows), and
bench/results/model_determinism.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import k2lab
from k2lab.config import ModelConfig
from k2lab.model import Experts, K2ForCausalLM
from k2lab.runs import write_json
from k2lab.model.decode import Decoder

RESULTS = Path(__file__).parent / "results"


def paired(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each run function (a call returns its own seconds), alternating the two so that
    load from elsewhere on the machine hits both alike; one warm-up call each."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(theirs())
    return statistics.median(a), statistics.median(b)


def clock(fn):
    def run():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def train_step(forward, params, ids):
    def step():
        for p in params:
            p.grad = None
        logits = forward(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    return step


def scatter_add_combine(self, x, idx, weight):
    """The MoE combine k2lab used before (the reference): gather by index, then index_add_ into the tokens,
    whose backward adds repeated indices in a thread-dependent order."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    token = order // idx.shape[1]
    y = self.grouped_ffn(x[token], torch.bincount(flat, minlength=self.n_experts))
    y = y * weight.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def determinism_cost(config: ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    """Training step (fwd+bwd) with the deterministic combine vs the scatter-add one, alternating; medians."""
    torch.manual_seed(0)
    model = K2ForCausalLM(config).train()
    model.init_weights(seed=0)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    step = train_step(model, list(model.parameters()), ids)
    deterministic = Experts.forward

    def with_combine(forward):
        def run():
            Experts.forward = forward
            try:
                return clock(step)()
            finally:
                Experts.forward = deterministic
        return run

    def reproducible(forward) -> bool:
        grads = []
        for _ in range(3):
            with_combine(forward)()
            grads.append([p.grad.clone() for p in model.parameters()])
        return all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))

    t_det, t_prev = paired(with_combine(deterministic), with_combine(scatter_add_combine), repeats)
    return {"train_step_s_deterministic": t_det, "train_step_s_scatter_add": t_prev,
            "deterministic_over_scatter_add_time": t_det / t_prev,
            "bitwise_reproducible_deterministic": reproducible(deterministic),
            "bitwise_reproducible_scatter_add": reproducible(scatter_add_combine),
            "batch": batch, "seq_len": seq, "threads": torch.get_num_threads(), "repeats": repeats}


def k2_decode(model, batch, context, steps):
    """k2lab's compiled decoder (k2lab.model.decode; compiled on the warm-up call): eager prefill, timed steps.
    bench/decode.py compares it with eager k2lab too, and at 8K / 32K."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    decoder = Decoder(model, batch, context + steps)

    def run():
        with torch.no_grad():
            decoder.prefill(ids)
            tok = ids[:, -1]
            start = time.perf_counter()
            for i in range(steps):
                tok = decoder.step(tok, torch.full((batch,), context + i)).argmax(-1)
        return time.perf_counter() - start
    return run


def hf_decode(hf, batch, context, steps, vocab):
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (batch, context))

    def run():
        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            out = hf(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = hf(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--determinism-only", action="store_true", help="only the MoE combine comparison")
    args = parser.parse_args()
    batch, seq = (2, 128) if args.quick else (8, 512)
    cost = determinism_cost(ModelConfig.preset(args.preset), batch, seq, args.repeats)
    write_json(RESULTS / "model_determinism.json", {"preset": args.preset, "torch": torch.__version__, **cost})
    print(json.dumps(cost, indent=1), flush=True)
    if args.determinism_only:
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset)
    model = K2ForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        k2lab.save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    steps = 16 if args.quick else 64
    contexts = [128, 512] if args.quick else [128, 2048]
    rows = []

    def row(name, ours, theirs, unit="tokens/s"):
        rows.append({"metric": name, "k2lab": ours, "transformers": theirs, "ratio": ours / theirs, "unit": unit})
        print(f"{name:<34} k2lab {ours:>10.1f}  transformers {theirs:>10.1f}  ratio {ours / theirs:5.2f}x",
              flush=True)

    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    model.train(), hf.train()
    t_ours, t_hf = paired(clock(train_step(model, list(model.parameters()), ids)),
                          clock(train_step(lambda x: hf(x).logits, list(hf.parameters()), ids)), args.repeats)
    row(f"train step fwd+bwd ({batch}x{seq})", batch * seq / t_ours, batch * seq / t_hf)
    model.eval(), hf.eval()
    with torch.no_grad():
        t_ours, t_hf = paired(clock(lambda: model(ids[:, :seq])), clock(lambda: hf(ids[:, :seq])), args.repeats)
    row(f"prefill ({batch}x{seq})", batch * seq / t_ours, batch * seq / t_hf)
    for context in contexts:
        for b in (1, 8):
            t_ours, t_hf = paired(k2_decode(model, b, context, steps),
                                  hf_decode(hf, b, context, steps, config.vocab_size), args.repeats)
            row(f"decode batch {b} @ context {context}", b * steps / t_ours, b * steps / t_hf)
    # transformers caches per-head keys and values (qk_head_dim + v_head_dim per head) for every layer.
    hf_bytes = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 2
    row("cache bytes per token (bf16)", config.cache_bytes_per_token(2), hf_bytes, unit="bytes")
    result = {"preset": args.preset, "quick": args.quick, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model.json").write_text(json.dumps(result, indent=2))
    table = ["| metric | k2lab | transformers | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {r['metric']} | {r['k2lab']:,.0f} {r['unit']} | {r['transformers']:,.0f} | {r['ratio']:.2f}x |"
              for r in rows]
    (RESULTS / "model.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
