"""The report card: RUN_DIR/report.md, report.json and plots/, rebuilt from the stages' records on every run.

A plain-language summary first (what worked and what did not, from the numbers), then Moonshot's published
claims next to what this run measured, each stage's numbers, the evals after every stage that changed the
model, time per stage, and the machine. Missing values read "n/a", never Python's None.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from k2lab.pipeline.builders import LIMITS
from k2lab.pipeline.presets import Recipe
from k2lab.runs import write_atomic, write_json
from k2lab.train.metrics import read_metrics

EVAL_STAGES = (("base", "eval_base"), ("SFT", "eval_sft"), ("RL", "eval_rl"), ("INT4", "eval_int4"))


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    return str(v)


def pct(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{100 * v:.0f}%"
    if ci and None not in ci:
        s += f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    return s


def machine() -> dict:
    import torch

    import k2lab

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                     platform.processor() or "unknown")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "k2lab": k2lab.__version__,
            "load_average_1m": round(os.getloadavg()[0], 2)}


def _plots(run_dir: Path, res: dict) -> list[str]:
    """Plots made here (evals across stages, QK-Clip) plus the training runs' own; only files that exist and
    are not empty are linked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    stages = [(label, res[key]) for label, key in EVAL_STAGES if key in res]
    if stages:
        series = {"tool-call trigger F1": lambda e: e["toolcalls"]["trigger_f1"],
                  "tool-call schema accuracy": lambda e: e["toolcalls"]["schema_accuracy"],
                  "calibration accuracy": lambda e: e["calibration"]["accuracy"],
                  "hallucination rate": lambda e: e["calibration"]["hallucination_rate"],
                  "agent task success": lambda e: e["agent"]["success_rate"],
                  "coding pass@1": lambda e: e["coding"]["pass_at_1"]}
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, get in series.items():
            ys = [get(e) for _, e in stages]
            ax.plot([s for s, _ in stages], [float("nan") if y is None else y for y in ys], "o-", label=name)
        ax.set(ylim=(-0.05, 1.05), title="evals after each stage that changed the model (served)")
        ax.legend(fontsize=7)
        fig.savefig(out / "evals.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    train = [x for x in read_metrics(run_dir / "pretrain") if x.get("max_logit")]
    if train and "pretrain" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([x["step"] for x in train], [max(x["max_logit"]) for x in train], label="max attention logit")
        tau = res["pretrain"]["qk_clip_tau"]
        ax.axhline(tau, color="red", ls="--", label=f"tau {tau:g}")
        ax.plot([x["step"] for x in train], [sum(x.get("heads_clipped") or [0]) for x in train], label="heads clipped")
        ax.set(xlabel="pre-training step", title="QK-Clip during pre-training")
        ax.legend()
        fig.savefig(out / "qk_clip.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    found = [*sorted(out.glob("*.png"))] + [p for d in ("pretrain", "sft", "rl", "qat")
                                             for p in sorted((run_dir / d / "plots").glob("*.png"))]
    return [p.relative_to(run_dir).as_posix() for p in found if p.stat().st_size > 0]


def directions(res: dict) -> list[tuple[str, bool | None, str]]:
    """The three things the recipe should show, each (claim, held?, the numbers); held None when unmeasured."""
    out = []
    b, f = res.get("eval_base"), res.get("eval_int4") or res.get("eval_rl")
    if b and f:
        x, y = b["toolcalls"]["trigger_f1"], f["toolcalls"]["trigger_f1"]
        out.append(("tool-call F1 after post-training above the pre-trained model's",
                    None if x is None or y is None else y > x, f"{fmt(x)} -> {fmt(y)}"))
    s, rl = res.get("eval_sft"), res.get("eval_rl")
    if s and rl:
        x, y = s["calibration"]["hallucination_rate"], rl["calibration"]["hallucination_rate"]
        known = [c["calibration"].get("by_kind", {}).get("known", {}).get("accuracy") for c in (s, rl)]
        silent = (rl["calibration"]["abstention_rate"] or 0) >= 0.95
        out.append(("hallucination rate after calibration RL below the SFT model's",
                    None if x is None or y is None else y < x,
                    f"{pct(x, s['calibration']['hallucination_rate_ci95'])} -> "
                    f"{pct(y, rl['calibration']['hallucination_rate_ci95'])}; accuracy on known facts "
                    f"{pct(known[0])} -> {pct(known[1])}, abstentions "
                    f"{pct(s['calibration']['abstention_rate'])} -> {pct(rl['calibration']['abstention_rate'])}"
                    + ("; the RL model declines (almost) every question: for a model that gets "
                       f"{pct(known[0])} of the known facts right, that is what the +1 / -1 / 0 reward pays "
                       "for, calibration by not answering rather than by knowing more (what a base answers in "
                       "the chat format: experiments/knowledge_extraction.py; from the default preset's 800-step "
                       "base, pre-trained with half of the questions mixed in as conversations, RL kept 30-36% of "
                       "the known facts right while hallucination fell 19.7 points (experiments/"
                       "post_training_calibration.py, 3 seeds) and 41 (the default `make run`))" if silent else "")))
    if b and f:
        new = sorted(set(f["agent"]["solved"]) - set(b["agent"]["solved"]))
        out.append(("the trained model completes embedded agent tasks the pre-trained one fails", bool(new),
                    f"{b['agent']['succeeded']}/{b['agent']['tasks']} -> {f['agent']['succeeded']}/"
                    f"{f['agent']['tasks']} ({len(new)} newly solved)"))
    return out


def claims(res: dict) -> list[tuple[str, str]]:
    p, q, s, rl = res.get("pretrain"), res.get("qat"), res.get("eval_sft"), res.get("eval_rl")
    f = res.get("eval_int4")
    rows = []
    if s and rl:
        before, after = s["calibration"], rl["calibration"]
        rows.append(("K2.6: hallucination rate 65% -> 39% on AA-Omniscience (post-training)",
                     f"SFT {pct(before['hallucination_rate'], before['hallucination_rate_ci95'])} -> RL "
                     f"{pct(after['hallucination_rate'], after['hallucination_rate_ci95'])} on {before['total']} "
                     "encyclopedia questions (rules grader)"))
    if f:
        t = f["toolcalls"]
        ok = t["trigger_f1"] is not None and t["trigger_f1"] >= 0.80
        rows.append(("K2 Vendor Verifier: tool-call trigger F1 >= 0.80 (instruct)",
                     f"INT4 model: F1 {fmt(t['trigger_f1'])} ({'meets' if ok else 'below'} the bar), schema accuracy "
                     f"{fmt(t['schema_accuracy'])} over {t['tool_call_responses']} tool-call answers"))
    if p:
        acted = p["head_clips_total"] > 0
        rows.append(("MuonClip: QK-Clip keeps max attention logits bounded (K2: tau 100, no loss spike)",
                     f"tau {fmt(p['qk_clip_tau'])}; peak max logit {fmt(p['max_logit_peak'])}, final "
                     f"{fmt(p['max_logit_final'])}; clip " + (f"acted on {p['steps_clipped']} of {p['steps']} steps "
                                                              f"({p['head_clips_total']} head clips)" if acted
                                                              else "never acted (logits stayed below tau)")))
    if q and rl and f:
        a, b, kl = q["qat_agreement"], q["ptq_agreement"], q.get("heldout_kl")
        reference = "the RL model" if q.get("distill") else "its full-precision weights"
        rows.append(("K2 Thinking: INT4 QAT is lossless",
                     (f"held-out KL from the RL model: QAT-INT4 {kl['qat']:.3g}, PTQ-INT4 {kl['ptq']:.3g} "
                      f"nats/token ({kl['tokens']} assistant tokens); " if kl else "") +
                     f"greedy agreement QAT-INT4 vs {reference} {pct(a['token_agreement'])}, "
                     f"PTQ-INT4 vs RL weights {pct(b['token_agreement'])} ({a['prompts']} prompts x "
                     f"{a['tokens_per_prompt']} tokens); tool-call F1 RL {fmt(rl['toolcalls']['trigger_f1'])} vs "
                     f"INT4 {fmt(f['toolcalls']['trigger_f1'])}"))
    if f and f.get("swarm"):
        w = f["swarm"]
        rows.append(("K2.6 Agent Swarm: critical steps well below total steps",
                     f"critical steps {w['critical_steps']} vs {w['model_calls']} model calls; "
                     f"{w['subagents']} sub-agents created, {w['subagent_runs']} sub-agent runs"))
    return rows


def _table(header: tuple[str, ...], rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows], ""]


def _finetune_table(title: str, s: dict) -> list[str]:
    return [f"## {title}", "", *_table(("metric", "value"), [
        ("steps", s["steps"]), ("training loss, first 3 / last 3 steps",
                                f"{fmt(s.get('loss_first'))} / {fmt(s.get('loss_last'))}"),
        ("held-out loss", s["val_loss"]),
        ("tool-call F1 on held-out conversations of the training domains (their tools; in-process, at the end)",
         s["toolcall_f1"]),
        ("... schema accuracy there (the eval on held-out tools is under Evals)", s["toolcall_schema_accuracy"]),
        *([("in-context copying (see pre-training)", copy_text(s["copying"]))] if s.get("copying") else [])])]


def copy_text(c: dict) -> str:
    return (f"loss {c['first_nll']:.2f} nats on a held-out {c['span']}-token span, {c['repeat_nll']:.2f} when it is "
            f"read again right after (tokens predicted exactly: {_share(c.get('first_top1'))} the first time, "
            f"{c['repeat_top1']:.0%} the second; {c['rows']} spans)")


def _share(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def qat_calibration_limit(res: dict) -> str | None:
    """A summary line when the served INT4 model hallucinates more than the RL model it was made from, beyond the
    RL model's 95% interval (QAT continues on the SFT data, which can pull the model back to SFT's behaviour)."""
    rl, q = ((res.get(k) or {}).get("calibration") or {} for k in ("eval_rl", "eval_int4"))
    ci = rl.get("hallucination_rate_ci95")
    if q.get("hallucination_rate") is None or not ci or None in ci or q["hallucination_rate"] <= ci[1]:
        return None
    return (f"the INT4 model hallucinates more than the RL model it was made from: "
            f"{pct(q['hallucination_rate'], q.get('hallucination_rate_ci95'))} against "
            f"{pct(rl['hallucination_rate'], ci)}. " +
            ("QAT distilled the RL model (it did not train on the conversations), so the gap is what INT4 lost; "
             "the held-out KL under INT4 QAT compares it with PTQ's " if (res.get("qat") or {}).get("distill") else
             "INT4 QAT trains on the SFT conversations, which pulls the model back toward SFT's answers; "
             "`qat_distill` or a lower `qat_lr` keeps more of RL's calibration ") + "(k2lab/pipeline/presets.py)")


def copy_limit(res: dict) -> str | None:
    """A summary line when the pre-trained model does not copy from its context (and what that explains)."""
    c = (res.get("pretrain") or {}).get("copying")
    if not c or c["repeat_nll"] < 0.5 * c["first_nll"]:
        return None
    return (f"the pre-trained model does not copy from its context: its loss on a span it has just read is "
            f"{c['repeat_nll']:.2f} nats against {c['first_nll']:.2f} the first time (a model with induction heads "
            "drops near 0). Calling a tool by the name declared in its prompt and carrying a request's or a tool "
            "result's values into a call or an answer need that (held-out tool schema accuracy and the agent tasks "
            "below). No remedy tried here formed it (experiments/in_context_copying.py and the README: a tied "
            "head, synthetic copy rows, copying-only SFT names; pure copy training learned a fixed 64-token lookup, "
            "not induction). With Muon, copying by content does form on random spans over a small alphabet "
            "(experiments/induction_plateau.py: 99% of 16-token spans after ~750 steps; AdamW stays flat for 1,500) "
            "but is tied to the tokens it formed on: widening the alphabet afterwards did not extend it, and over "
            "the whole vocabulary it did not form in 1,000-2,000 steps. Longer pre-training (the `small` and `gpu` "
            "presets) is the likely remedy, not measured here")


def rl_tool_limit(res: dict, r: Recipe) -> str | None:
    """A summary line when RL without tool tasks lost much of the SFT model's tool calling (what brought it back,
    and what would keep it)."""
    sft, rl, int4 = (((res.get(k) or {}).get("toolcalls") or {}).get("trigger_f1")
                     for k in ("eval_sft", "eval_rl", "eval_int4"))
    if sft is None or rl is None or r.rl_env_names() != ["knowledge"] or rl >= 0.75 * sft:
        return None
    back = (f"; the INT4 QAT stage trains on the SFT conversations again, which brought it back to {fmt(int4)}"
            if int4 is not None else "")
    ptx = (f"even with K2's PTX loss on the SFT conversations (weight {fmt(r.rl_ptx_weight)}, {r.rl_ptx_rows} rows "
           f"of {r.rl_ptx_seq_len} tokens a step)" if r.rl_ptx_weight > 0 else
           "without K2's PTX loss (the recipe's rl_ptx_weight is 0; the default preset's 0.1 kept most of it)")
    return (f"RL here trains on calibration questions only, and tool calling faded {ptx}: tool-call F1 "
            f"{fmt(sft)} (SFT) -> {fmt(rl)} (RL){back}. The `small` and `gpu` presets mix tool tasks into RL")


def _stage_sections(res: dict, r: Recipe) -> list[str]:
    lines = []
    if "tokenizer" in res:
        t = res["tokenizer"]
        lines += ["## Tokenizer", "", f"BPE vocabulary {t['vocab_size']} trained on the encyclopedia, then the "
                  "embedded corpus. "
                  f"Pre-training data: {t['pretrain_data_bytes'] / 1e6:.2f} MB (a seeded subset of the corpus), "
                  f"plus encyclopedia articles as a share of the training rows (the preset's `encyclopedia`).", ""]
    if "pretrain" in res:
        p = res["pretrain"]
        # the recipe's pre-training mix (a run directory holds one recipe: k2lab.runs.claim)
        mix = [("encyclopedia rows (share of the training rows)", r.encyclopedia),
               *([("questions mixed in", f"{r.encyclopedia_qa_entities} of the post-training entities' articles "
                                         f"end with their questions answered ({r.encyclopedia_qa_format} format)")]
                 if r.encyclopedia_qa else []),
               ("output head tied to the embeddings", "yes" if r.tie_embeddings else "no")]
        lines += ["## Pre-training with MuonClip", "", *_table(("metric", "value"), [
            *mix, ("steps", p["steps"]), ("tokens", p["tokens"]), ("training loss, first step", p["first_loss"]),
            ("training loss, mean of the last (up to) 10 steps", p["final_loss"]),
            ("held-out loss (rows spread over the same corpus)", p["val_loss"]),
            ("QK-Clip tau", p["qk_clip_tau"]), ("max attention logit, peak / final",
                                                f"{fmt(p['max_logit_peak'])} / {fmt(p['max_logit_final'])}"),
            ("steps where QK-Clip acted", f"{p['steps_clipped']} of {p['steps']}"),
            ("head clips in total", p["head_clips_total"]), ("tokens/s (last step)", p["tokens_per_s"]),
            *([("in-context copying (k2lab.evals.copying)", copy_text(p["copying"]))] if p.get("copying") else [])])]
    if "synth" in res:
        t = res["synth"]["totals"]
        lines += ["## Synthesis", "", f"{t['kept']} of {t['trajectories']} trajectories kept (rejected "
                  f"{t['rejected']}) on the embedded domains; the kept ones are the SFT data.", ""]
    if "sft" in res:
        lines += _finetune_table("SFT", res["sft"])
    if "rl" in res:
        s = res["rl"]
        keys = ("reward", "accuracy", "hallucination_rate", "abstention_rate", "all_equal_groups",
                "response_tokens", "entropy", "ptx_loss")
        ptx = (f" K2's PTX loss: {fmt(r.rl_ptx_weight)} x the cross-entropy of {r.rl_ptx_rows} packed rows of "
               f"{r.rl_ptx_seq_len} tokens of the SFT conversations a step (ptx_loss), so RL on questions keeps "
               "what SFT taught." if "ptx_loss_last" in s else "")
        lines += ["## RL (K1.5 objective; rollouts, mean of the first 3 and last 3 steps)", "",
                  *_table(("metric", "first", "last"), [(k, s.get(f"{k}_first"), s.get(f"{k}_last")) for k in keys
                                                        if f"{k}_last" in s]),
                  f"Steps: {s['steps']}.{ptx}", ""]
    if "qat" in res:
        q = res["qat"]
        lines += _finetune_table("INT4 QAT (self-distillation from the RL model on the SFT conversations, "
                                 "fake-quantized experts)" if q.get("distill") else
                                 "INT4 QAT (SFT data, fake-quantized experts)", q)
        if q.get("distill"):
            lines += ["The losses above are KL(RL model || model being trained) per assistant token, not "
                      "cross-entropy: QAT learns to make up for what quantizing loses, not the conversations.", ""]
        if kl := q.get("heldout_kl"):
            lines += ["### INT4 vs full precision: KL from the RL model on held-out SFT rows", "",
                      *_table(("INT4 checkpoint", "held-out rows", "assistant tokens", "KL (nats/token)"),
                              [("QAT", kl["rows"], kl["tokens"], f"{kl['qat']:.3g}"),
                               ("PTQ (the RL model quantized without QAT)", kl["rows"], kl["tokens"],
                                f"{kl['ptq']:.3g}")])]
        rows = []
        for name, a in (("QAT: INT4 export vs the RL model it distilled" if q.get("distill") else
                         "QAT: INT4 export vs its full-precision weights", res["qat"]["qat_agreement"]),
                        ("PTQ: RL model quantized without QAT vs the RL model", res["qat"]["ptq_agreement"])):
            rows.append((name, f"{a['prompts']} x {a['tokens_per_prompt']}", pct(a["token_agreement"]),
                         a["mean_tokens_until_first_difference"]))
        lines += ["### INT4 vs full precision: greedy continuations of held-out chat prompts", "",
                  *_table(("comparison", "prompts x tokens", "tokens that agree", "mean tokens until first difference"),
                          rows)]
    return lines


def _eval_sections(res: dict) -> list[str]:
    stages = [(label, res[key]) for label, key in EVAL_STAGES if key in res]
    if not stages:
        return []
    rows = [
        ("tool-call trigger F1", *[e["toolcalls"]["trigger_f1"] for _, e in stages]),
        ("tool-call schema accuracy", *[e["toolcalls"]["schema_accuracy"] for _, e in stages]),
        ("answers with tool calls / requests", *[f"{e['toolcalls']['tool_call_responses']}/"
                                                 f"{e['toolcalls']['requests']}" for _, e in stages]),
        ("calibration accuracy [95% CI]", *[pct(e["calibration"]["accuracy"], e["calibration"]["accuracy_ci95"])
                                            for _, e in stages]),
        ("abstention rate", *[pct(e["calibration"]["abstention_rate"]) for _, e in stages]),
        ("hallucination rate [95% CI]", *[pct(e["calibration"]["hallucination_rate"],
                                              e["calibration"]["hallucination_rate_ci95"]) for _, e in stages]),
        *[(f"  {kind}: accuracy / abstention", *[
            f"{pct(e['calibration']['by_kind'].get(kind, {}).get('accuracy'))} / "
            f"{pct(e['calibration']['by_kind'].get(kind, {}).get('abstention_rate'))}" for _, e in stages])
          for kind in ("known", "unknown")],
        ("coding pass@1", *[e["coding"]["pass_at_1"] for _, e in stages]),
        ("embedded agent tasks solved", *[f"{e['agent']['succeeded']}/{e['agent']['tasks']}" for _, e in stages]),
    ]
    lines = ["## Evals after every stage that changed the model (each checkpoint served over the OpenAI API)", "",
             *_table(("metric", *[label for label, _ in stages]), rows),
             "Tool calls: the eval's request set with its expected finish_reason (trigger F1 = tool call or not); "
             "calibration: held-out encyclopedia questions about seen (known) and unseen (unknown) entities, graded by the deterministic "
             "rules grader, hallucination rate = wrong / (wrong + abstained); agent tasks: an agent with the "
             "domain's tools, success = every rubric checkpoint passed. Details under `evals/`.", ""]
    swarm = res.get("eval_int4", {}).get("swarm")
    if swarm:
        lines += ["## Swarm run (INT4 model as orchestrator and sub-agents)", "", *_table(("metric", "value"), [
            ("outcome", swarm["outcome"]), ("sub-agents created", swarm["subagents"]),
            ("sub-agent runs", swarm["subagent_runs"]), ("critical steps", swarm["critical_steps"]),
            ("model calls (total steps)", swarm["model_calls"]), ("tool calls", swarm["tool_calls"])]),
            f"Final output: `{swarm['output'][:200]!r}`", ""]
    return lines


def write_report(run_dir: Path, preset_name: str, r: Recipe, records: list[dict], this_run_s: float) -> Path:
    res = {rec["name"]: rec["result"] for rec in records}
    total = sum(rec["wall_s"] for rec in records)
    m = machine()
    plots = _plots(run_dir, res)
    dirs = directions(res)
    summary = [f"- {'worked' if ok else ('not measured' if ok is None else 'did NOT work')}: {what} ({numbers})"
               for what, ok, numbers in dirs]
    progress = []
    for name, steps in (("pretrain", r.pretrain_steps), ("sft", r.sft_steps), ("rl", r.rl_steps),
                        ("qat", r.qat_steps)):
        logged = [x for x in read_metrics(run_dir / name) if "loss" in x] if name not in res else []
        if logged:
            progress.append(f"- in progress: {name} at step {logged[-1]['step']} of {steps} "
                            f"({fmt(logged[-1].get('tokens_per_s'))} tokens/s at the last step; a rerun resumes "
                            "from its last checkpoint)")
    missing = [name for name in ("tokenizer", "pretrain", "eval_base", "synth", "sft", "eval_sft", "rl", "eval_rl",
                                 "qat", "eval_int4") if name not in res]
    lines = [
        "# k2lab `make run`: the K2.6 recipe on the embedded data", "",
        f"Preset `{preset_name}` (model `{r.model}`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"k2lab {m['k2lab']}, {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, GPU: {m['gpu']}), "
        f"torch {m['torch']}, 1-minute load average at the end {m['load_average_1m']}. Total stage time "
        f"{total / 60:.1f} min (this invocation {this_run_s / 60:.1f} min; finished stages are reused).", "",
        "## Summary", "",
        "A tiny MoE model is pre-trained with MuonClip on Python source plus an invented encyclopedia, fine-tuned "
        "on synthesized tool-use trajectories, trained with RL ("
        + ("calibration questions only" if r.rl_env_names() == ["knowledge"]
           else f"environments {', '.join(r.rl_env_names())}")
        + (", with K2's PTX loss on the SFT conversations" if r.rl_ptx_weight > 0 else "") + "), "
        "quantized to INT4 with QAT and served over the OpenAI API. What the run shows:", "",
        *summary, *[f"- limitation: {x}" for x in [*LIMITS, rl_tool_limit(res, r), qat_calibration_limit(res),
                                                        copy_limit(res)] if x],
        *([f"- stages not finished yet: {', '.join(missing)}"] if missing else []), *progress, "",
        "## Published claim | what this run measured", "",
        *(_table(("published claim", "what this run measured"), claims(res)) if claims(res)
          else ["No stage that measures a claim has finished yet.", ""]),
        *_stage_sections(res, r), *_eval_sections(res),
        "## Time per stage", "", *_table(("stage", "seconds", "attempts"),
                                          [(rec["title"], f"{rec['wall_s']:.1f}", len(rec["attempts"]))
                                           for rec in records] + [("total", f"{total:.1f}", "")]),
        "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
        "## Recipe (the preset's settings)", "", *_table(("setting", "value"), sorted(r.as_dict().items())),
    ]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    write_json(run_dir / "report.json", {
        "preset": preset_name, "recipe": r.as_dict(), "machine": m, "total_stage_s": total,
        "stages": {rec["name"]: {"title": rec["title"], "wall_s": rec["wall_s"], "attempts": rec["attempts"],
                                 "result": rec["result"]} for rec in records},
        "directions": [{"claim": what, "held": ok, "numbers": numbers} for what, ok, numbers in dirs],
        "claims": [{"claim": c, "measured": v} for c, v in claims(res)], "plots": plots})
    return path
