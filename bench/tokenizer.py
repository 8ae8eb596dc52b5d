"""Tokenizer benchmark: training time, and encode throughput on the embedded corpus, k2lab (tiktoken) vs
transformers' AutoTokenizer (Hugging Face `tokenizers`) loading the same saved files.

    .venv/bin/python bench/tokenizer.py [--repeat 3] [--vocab 8192 32768]

Both sides encode the whole embedded corpus (the stdlib source, file by file) and must give identical ids.
Medians over --repeat runs; the machine is shared, so absolute numbers are noisy, ratios less so.
Results go to bench/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from k2lab.data.corpus import iter_texts
from k2lab.tokenizer import Tokenizer, train_tokenizer
from k2lab.tokenizer.train import BYTES_PER_TOKEN

RESULTS = Path(__file__).parent / "results" / "tokenizer.json"


def median_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_vocab(vocab_size: int, texts: list[str], repeat: int) -> dict:
    from transformers import AutoTokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as d:
        train_s, _ = median_time(lambda: train_tokenizer(vocab_size, out_dir=d), repeat)
        tok = Tokenizer.load(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoTokenizer.from_pretrained(d)
    threads = os.cpu_count() or 1
    runs = {
        "k2lab encode (1 thread)": lambda: [tok.encode(t, allow_special=True) for t in texts],
        f"k2lab encode_batch ({threads} threads)": lambda: tok.encode_batch(texts, True, num_threads=threads),
        "AutoTokenizer encode (per file)": lambda: [hf.encode(t, add_special_tokens=False) for t in texts],
        "AutoTokenizer batch call": lambda: hf(texts, add_special_tokens=False)["input_ids"],
    }
    seconds, ids = {}, {}
    for name, fn in runs.items():
        seconds[name], ids[name] = median_time(fn, repeat)
    reference = ids["k2lab encode (1 thread)"]
    if any(v != reference for v in ids.values()):
        raise AssertionError(f"vocab {vocab_size}: k2lab and AutoTokenizer disagree on the corpus ids")
    n_tokens = sum(map(len, reference))
    return {
        "train_seconds": round(train_s, 3), "train_bytes": BYTES_PER_TOKEN * vocab_size,
        "corpus_mb": round(mb, 3), "tokens": n_tokens, "bytes_per_token": round(mb * 1e6 / n_tokens, 3),
        "encode_mb_per_s": {k: round(mb / s, 3) for k, s in seconds.items()},
        "ids_identical": True,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    args = ap.parse_args()
    texts = list(iter_texts())
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus (shared)",
               "repeat": args.repeat, "files": len(texts),
               "note": "medians; shared machine, timings noisy; ids of all four encoders checked identical",
               "vocabs": {str(v): bench_vocab(v, texts, args.repeat) for v in args.vocab}}
    print(f"embedded corpus: {len(texts)} files, {results['vocabs'][str(args.vocab[0])]['corpus_mb']} MB; "
          f"median of {args.repeat}\n")
    names = list(next(iter(results["vocabs"].values()))["encode_mb_per_s"])
    print(f"{'vocab':>6} {'train s':>8} {'bytes/tok':>9} " + " ".join(f"{n[:24]:>24}" for n in names)
          + f" {'k2lab/AutoTok':>13}")
    for v, r in results["vocabs"].items():
        speeds = r["encode_mb_per_s"]
        ratio = speeds[names[0]] / speeds[names[2]]
        r["k2lab_vs_autotokenizer_per_file"] = round(ratio, 2)
        print(f"{v:>6} {r['train_seconds']:>8.2f} {r['bytes_per_token']:>9.2f} "
              + " ".join(f"{speeds[n]:>19.2f} MB/s" for n in names) + f" {ratio:>12.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
