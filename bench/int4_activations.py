"""INT4 decode on CPU: does a kernel path without bf16 activations help? (issue 17, item 4)

1. Decode, `tiny`, batch 1: the fp32 model vs the same model with INT4 routed experts (Int4Experts, torch's
   CPU INT4 kernel with bf16 activations), eager generate, runs alternating, medians.
2. The kernel itself (`aten._weight_int4pack_mm_for_cpu`) for one token with bf16 activations (what Int4Experts
   does) and with fp32 activations and fp32 scales (the path that would skip the conversions), beside fp32
   F.linear, at a `tiny` expert shape and a K2 expert shape.

    python bench/int4_activations.py      # writes bench/results/int4_activations.json
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2lab.config import ModelConfig  # noqa: E402
from k2lab.model import K2ForCausalLM  # noqa: E402
from k2lab.quant.checkpoint import quantize_experts_  # noqa: E402
from k2lab.quant.experts import Int4Experts  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "int4_activations.json"


def alternating(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function, called in turn after one warm-up each."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel(n: int, k: int, repeats: int) -> dict:
    w = torch.randn(n, k) * 0.02
    experts = Int4Experts.from_weights(w[None], w[None], w.T[None].contiguous())
    packed, scale = experts.gate_proj_packed[0].view(n, -1), experts.gate_proj_scale[0]
    x = torch.randn(1, k)

    def int4(dtype):
        zeros = torch.stack((scale.to(dtype), torch.zeros_like(scale, dtype=dtype)), -1)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, experts.group_size, zeros)

    us = alternating({"int4_bf16_activations": int4(torch.bfloat16), "int4_fp32_activations": int4(torch.float32),
                      "fp32_linear": lambda: F.linear(x, w)}, repeats)
    return {"shape": [n, k], "median_us": {name: s * 1e6 for name, s in us.items()}}


def main() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM(ModelConfig.preset("tiny")).eval()
    quantized = quantize_experts_(copy.deepcopy(model)).eval()
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    new = 64
    seconds = alternating({"fp32": lambda: model.generate(prompt, new),
                           "int4_experts": lambda: quantized.generate(prompt, new)}, 5)
    tps = {name: new / s for name, s in seconds.items()}
    result = {"threads": torch.get_num_threads(),
              "decode_tiny_batch1": {"tokens_per_s": tps, "int4_over_fp32": tps["int4_experts"] / tps["fp32"]},
              "kernel": [kernel(128, 256, 200), kernel(2048, 7168, 20)]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
