"""`make run` / `k2lab demo`: the whole K2.6 recipe on the embedded data, stage by stage, each resumable.

tokenizer -> pre-training with MuonClip (corpus + the synthetic encyclopedia's seen entities) -> synthesis on the
embedded domains -> SFT -> RL (calibration; the longer presets add tool tasks) -> INT4 QAT -> the INT4 checkpoint
served over the OpenAI API, with an agent run and a small swarm run -> the evals after every stage that changes
the model (base, SFT, RL, INT4) -> RUN_DIR/report.md, report.json and plots. The numbers are the preset's
(k2lab.pipeline.presets); the data and eval sets come from k2lab.pipeline.builders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from k2lab.evals.copying import probe_checkpoint
from k2lab.pipeline import builders
from k2lab.pipeline.card import write_report
from k2lab.pipeline.evaluate import evaluate
from k2lab.pipeline.presets import Recipe, preset
from k2lab.pipeline.stages import Stages
from k2lab.runs import claim
from k2lab.train.checkpoint import checkpoint_dirs
from k2lab.train.loop import completed_steps
from k2lab.train.metrics import read_metrics


def pretrain_summary(run_dir: Path, r: Recipe) -> dict:
    """The numbers of a pre-training (or any loop) run from its metrics log: the final training loss as the
    mean of the last 10 steps, the held-out loss, and QK-Clip's max logits and how often it acted."""
    records = read_metrics(run_dir)
    train = [x for x in records if "loss" in x]
    val = [x for x in records if "val_loss" in x]
    logits = [max(x["max_logit"]) for x in train if x.get("max_logit")]
    clipped = [sum(x["heads_clipped"]) for x in train if x.get("heads_clipped")]
    tail = train[-10:]
    return {"steps": train[-1]["step"], "tokens": train[-1].get("tokens"),
            "first_loss": train[0]["loss"], "final_loss": sum(x["loss"] for x in tail) / len(tail),
            "val_loss": val[-1]["val_loss"] if val else None,
            "qk_clip_tau": r.qk_clip_tau, "max_logit_peak": max(logits) if logits else None,
            "max_logit_final": logits[-1] if logits else None,
            "steps_clipped": sum(c > 0 for c in clipped), "head_clips_total": sum(clipped),
            "tokens_per_s": train[-1].get("tokens_per_s")}


def train_once(run_dir: Path, steps: int, fn: Callable[[], dict | None]) -> dict:
    """fn() trains the loop run in run_dir to `steps` and may return its last metrics record. A run that already got
    there is not trained again (a `make run` stopped after a stage's training but before its record was written:
    the loop refuses a finished run); its last logged record stands in for fn's."""
    if completed_steps(run_dir) >= steps:
        return read_metrics(run_dir)[-1]
    return fn() or {}


def loop_summary(run_dir: Path, keys: tuple[str, ...]) -> dict:
    """First and last logged value of each key (RL: the mean of the first and last three steps)."""
    records = [x for x in read_metrics(run_dir) if "loss" in x]
    out = {"steps": records[-1]["step"] if records else 0}
    for key in keys:
        vals = [x[key] for x in records if isinstance(x.get(key), (int, float))]
        if vals:
            k = min(3, len(vals))
            out[f"{key}_first"], out[f"{key}_last"] = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return out


def agreement(fp_dir: Path, int4_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy continuations of the same prompts by the full-precision and the INT4 checkpoint: the share of
    the P x T generated tokens that agree, and how long each continuation agrees from its start."""
    import k2lab

    fp, q = k2lab.load_model(fp_dir, dtype=torch.float32), k2lab.load_model(int4_dir)
    same, first_diff = 0, []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            a, b = fp.generate(x, new_tokens)[0, len(ids):], q.generate(x, new_tokens)[0, len(ids):]
            eq = (a == b)
            same += int(eq.sum())
            first_diff.append(new_tokens if bool(eq.all()) else int((~eq).nonzero()[0]))
    return {"prompts": len(prompts), "tokens_per_prompt": new_tokens,
            "token_agreement": same / (len(prompts) * new_tokens),
            "mean_tokens_until_first_difference": sum(first_diff) / len(first_diff),
            "tokens_until_first_difference": first_diff}


def heldout_kl(fp_dir: Path, int4_dirs: dict[str, Path], rows: Path, micro: int, max_rows: int | None = None) -> dict:
    """Per checkpoint of int4_dirs: the mean KL(full precision || INT4) of the next-token distributions over the
    assistant tokens of held-out packed SFT rows (the first max_rows): how much of the full-precision model
    quantizing lost."""
    import functools

    import k2lab
    from k2lab.train.loop import evaluate as mean_loss
    from k2lab.train.sft import distill_losses, load_packed, loop_batch

    fp, batch = k2lab.load_model(fp_dir, dtype=torch.float32).eval(), loop_batch(load_packed(rows), slice(max_rows))
    return {"rows": int(batch["tokens"].shape[0]), "tokens": int(batch["loss_mask"].sum()),
            **{name: mean_loss(k2lab.load_model(d), batch, micro, functools.partial(distill_losses, fp))
               for name, d in int4_dirs.items()}}


def chat_prompts(sft_dir: Path, tokenizer_dir: Path, n: int, room: int) -> list[list[int]]:
    """The first user turn (with tools) of SFT's held-out conversations, rendered as generation prompts."""
    from k2lab.runs import read_jsonl
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.toolcall_eval import prompt_ids

    tok = Tokenizer.load(tokenizer_dir)
    out = []
    for conv in read_jsonl(sft_dir / "data" / "heldout.jsonl"):
        msgs = conv["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        ids = prompt_ids(tok, msgs[:first + 1], conv.get("tools"))
        if len(ids) <= room:
            out.append(ids)
        if len(out) == n:
            break
    return out


def run_demo(run_dir: str | Path = "runs/demo", preset_name: str = "default") -> Path:
    from k2lab.synth.pipeline import run_embedded
    from k2lab.tokenizer import train_tokenizer
    from k2lab.train.pretrain import pretrain
    from k2lab.train.qat import quantize
    from k2lab.train.rl.run import rl
    from k2lab.train.settings import PretrainSettings, RLSettings, SftSettings
    from k2lab.train.sft import sft
    from k2lab.config import ModelConfig

    r, run_dir = preset(preset_name), Path(run_dir)
    claim(run_dir, {"preset": preset_name, "recipe": r.as_dict()}, "demo")
    started = time.perf_counter()
    # the report is rebuilt after every stage, so an unfinished run has the report of what it finished
    st = Stages(run_dir, after=lambda records: write_report(run_dir, preset_name, r, records,
                                                            time.perf_counter() - started))
    data = builders.pretrain_data(run_dir, r)
    tok_dir = run_dir / "tokenizer"

    def tokenizer() -> dict:
        vocab = ModelConfig.preset(r.model).vocab_size
        tok = train_tokenizer(vocab, [str(p) for p in builders.tokenizer_data(run_dir, r)], out_dir=tok_dir)
        return {"vocab_size": tok.vocab_size, "pretrain_data_bytes": sum(p.stat().st_size for p in data)}
    st.run("tokenizer", "tokenizer (BPE, K2 split pattern) on the corpus + encyclopedia", tokenizer)
    val_rows = run_dir / "pretrain" / "data" / "val.npy"  # held-out pre-training rows: the copying probe's text

    def do_pretrain() -> dict:
        s = PretrainSettings(preset=r.model, optimizer="muonclip", qk_clip_tau=r.qk_clip_tau,
                             max_steps=r.pretrain_steps, batch_size=r.pretrain_batch, seq_len=r.pretrain_seq_len,
                             lr=r.pretrain_lr, seed=r.seed, encyclopedia=r.encyclopedia,
                             encyclopedia_qa=r.encyclopedia_qa, encyclopedia_qa_format=r.encyclopedia_qa_format,
                             encyclopedia_qa_entities=r.encyclopedia_qa_entities, tie_embeddings=r.tie_embeddings,
                             eval_every=max(1, r.pretrain_steps // 6), save_every=max(1, r.pretrain_steps // 12),
                             data=[str(p) for p in data], tokenizer=str(tok_dir), run_dir=str(run_dir / "pretrain"))
        train_once(run_dir / "pretrain", r.pretrain_steps, lambda: pretrain(s))
        return {**pretrain_summary(run_dir / "pretrain", r),
                "copying": probe_checkpoint(checkpoint_dirs(run_dir / "pretrain")[-1], val_rows)}
    st.run("pretrain", "pre-training with MuonClip", do_pretrain)
    base = checkpoint_dirs(run_dir / "pretrain")[-1]
    st.run("eval_base", "evals of the pre-trained model (served)",
           lambda: evaluate(base, run_dir / "evals" / "base", r, run_dir))

    synth_dir = run_dir / "synth"

    def synthesize() -> dict:
        card = run_embedded(r.synth_domains, r.synth_tasks, synth_dir, seed=r.seed,
                            resume=(synth_dir / "run.json").exists())
        return {"totals": card["totals"]}
    st.run("synth", "synthesis on the embedded domains (rule-based teacher, tools executed)", synthesize)
    sft_files = [str(p) for p in builders.sft_data(run_dir, synth_dir, r)]

    def do_sft(name: str, checkpoint: Path, steps: int, lr: float, qat: bool, distill: bool = False) -> dict:
        s = SftSettings(checkpoint=str(checkpoint), data=sft_files, max_steps=steps, batch_size=r.sft_batch,
                        seq_len=r.sft_seq_len, lr=lr, qat=qat, distill=distill, seed=r.seed,
                        run_dir=str(run_dir / name), eval_every=steps, val_fraction=r.sft_val_fraction,
                        eval_max_new_tokens=r.sft_eval_max_new_tokens, optimizer="adamw" if qat else "muonclip",
                        qk_clip_tau=r.qk_clip_tau)
        last = train_once(run_dir / name, steps, lambda: sft(s))
        return {**loop_summary(run_dir / name, ("loss", "toolcall_f1")),
                "val_loss": last.get("val_loss"), "toolcall_f1": last.get("toolcall_f1"),
                "toolcall_schema_accuracy": last.get("toolcall_schema_accuracy"),
                "copying": probe_checkpoint(checkpoint_dirs(run_dir / name)[-1], val_rows)}
    st.run("sft", "SFT on the synthesized trajectories", lambda: do_sft("sft", base, r.sft_steps, r.sft_lr, False))
    sft_ckpt = checkpoint_dirs(run_dir / "sft")[-1]
    st.run("eval_sft", "evals of the SFT model (served)",
           lambda: evaluate(sft_ckpt, run_dir / "evals" / "sft", r, run_dir))

    def do_rl() -> dict:
        s = RLSettings(checkpoint=str(sft_ckpt), env=r.rl_envs, max_steps=r.rl_steps, batch_size=r.rl_batch,
                       samples=r.rl_samples, lr=r.rl_lr, max_new_tokens=r.rl_max_new_tokens,
                       max_turns=r.rl_max_turns, seed=r.seed, eval_every=max(1, r.rl_steps),
                       qk_clip_tau=r.qk_clip_tau, run_dir=str(run_dir / "rl"),
                       ptx_data=sft_files[0] if r.rl_ptx_weight > 0 else "",  # SFT's conversations
                       ptx_weight=r.rl_ptx_weight, ptx_rows=r.rl_ptx_rows, ptx_seq_len=r.rl_ptx_seq_len)
        train_once(run_dir / "rl", r.rl_steps, lambda: rl(s))
        return loop_summary(run_dir / "rl", ("reward", "accuracy", "hallucination_rate", "abstention_rate",
                                             "all_equal_groups", "response_tokens", "entropy", "ptx_loss"))
    st.run("rl", f"RL on {', '.join(r.rl_env_names())} (K1.5 objective"
           + (", PTX loss on the SFT conversations)" if r.rl_ptx_weight > 0 else ")"), do_rl)
    rl_ckpt = checkpoint_dirs(run_dir / "rl")[-1]
    st.run("eval_rl", "evals of the RL model (served)", lambda: evaluate(rl_ckpt, run_dir / "evals" / "rl", r, run_dir))

    int4_dir, ptq_dir = run_dir / "int4", run_dir / "int4-ptq"

    def do_qat() -> dict:
        out = do_sft("qat", rl_ckpt, r.qat_steps, r.qat_lr, True, r.qat_distill)
        latent = checkpoint_dirs(run_dir / "qat")[-1]
        quantize(latent, int4_dir)  # the rule QAT trained against (k2lab.quant), written as compressed-tensors
        quantize(rl_ckpt, ptq_dir)  # the baseline: the RL model quantized without QAT
        prompts = chat_prompts(run_dir / "sft", tok_dir, r.agreement_prompts, r.serve_max_len - r.agreement_tokens)
        return {**out, "latent_checkpoint": str(latent), "distill": r.qat_distill,
                "heldout_kl": heldout_kl(rl_ckpt, {"qat": int4_dir, "ptq": ptq_dir},
                                         run_dir / "qat" / "data" / "val.pt", r.sft_batch, r.kl_rows),
                # distilled, the QAT export stands in for the RL model, as PTQ's does; else it is compared with the
                # latent weights it was rounded from
                "qat_agreement": agreement(rl_ckpt if r.qat_distill else latent, int4_dir, prompts, r.agreement_tokens),
                "ptq_agreement": agreement(rl_ckpt, ptq_dir, prompts, r.agreement_tokens)}
    st.run("qat", "INT4 QAT (" + ("self-distillation from the RL model, " if r.qat_distill else "")
           + "fake-quantized routed experts) -> INT4 checkpoint", do_qat)
    st.run("eval_int4", "serve the INT4 checkpoint: evals, agent tasks and a swarm run",
           lambda: evaluate(int4_dir, run_dir / "evals" / "int4", r, run_dir, swarm=True))

    report = write_report(run_dir, preset_name, r, st.records(), time.perf_counter() - started)
    print(f"\nreport: {report}\nINT4 checkpoint: {int4_dir}")
    return report
