"""MoonViT encoder + projector: k2lab vs transformers' Kimi-K2.5 vision tower, same weights, same packed batch.

Real MoonViT width (1152, 16 heads, MLP 4304) with fewer layers so it runs on a shared laptop CPU; images of
different sizes in one batch plus a 4-frame video chunk. Prints and saves median times and the ratio; CPU timings
on a shared machine are noisy.
Run: .venv/bin/python bench/vision.py
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from k2lab.checkpoint import save_model  # noqa: E402
from k2lab.config import ModelConfig  # noqa: E402
from k2lab.model.multimodal import K2VLForConditionalGeneration, multimodal_config  # noqa: E402
from k2lab.model.vision import VisionConfig  # noqa: E402

LAYERS = 4
GRID = [(1, 16, 16), (1, 24, 32), (1, 10, 40), (4, 12, 16)]  # 224px, 336x448, a strip, a video chunk
REPEATS = 5


def median_times(fn_a, fn_b) -> tuple[float, float]:
    """Medians of interleaved runs (a, b, a, b, ...), so load changes on the machine hit both alike."""
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(REPEATS):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


@torch.no_grad()
def main() -> None:
    from transformers import Kimi_K25ForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(2)
    vision = dataclasses.replace(VisionConfig.preset("moonvit"), num_hidden_layers=LAYERS)
    model = K2VLForConditionalGeneration(multimodal_config(ModelConfig.preset("tiny"), vision)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        hf = Kimi_K25ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
    grid_thw = torch.tensor(GRID)
    pixel_values = torch.randn(sum(t * h * w for t, h, w in GRID), 3, 14, 14)

    ours = model.image_features(pixel_values, grid_thw)
    ref = torch.cat(hf.model.get_image_features(pixel_values, grid_thw).pooler_output)
    max_diff = (ours - ref).abs().max().item()
    t_ours, t_ref = median_times(lambda: model.image_features(pixel_values, grid_thw),
                                 lambda: hf.model.get_image_features(pixel_values, grid_thw))
    result = {
        "what": f"MoonViT width 1152, {LAYERS} layers, + projector; fp32 CPU, 2 threads; median of {REPEATS} interleaved runs",
        "grid_thw": [list(g) for g in GRID], "patches": int(pixel_values.shape[0]), "merged_tokens": int(ours.shape[0]),
        "k2lab_s": round(t_ours, 4), "transformers_s": round(t_ref, 4),
        "speed_ratio_transformers_over_k2lab": round(t_ref / t_ours, 3), "max_abs_diff": max_diff,
        "note": "shared 2-core machine: timings are noisy",
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "vision.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
