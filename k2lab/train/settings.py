"""The settings of training runs, as dataclasses: the loop's (TrainSettings) and pre-training's on top.

Torch-free, so the command line can generate its options from these fields (and their help) at import time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from k2lab.config import ModelConfig
from k2lab.data.encyclopedia import QA_ENTITIES, QA_FORMATS
from k2lab.optim.schedules import check_schedule


def option(default, help: str):
    """A settings field with its command-line help (the CLI options are generated from these fields)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainSettings:
    """How the loop optimizes; shared by every training command."""

    batch_size: int = option(8, "rows per optimizer step, over all ranks and micro-batches")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(200, "optimizer steps; a larger value continues a finished run")
    warmup_steps: int | None = option(None, "linear warm-up steps (default: min(20, max_steps/10))")
    schedule: str = option("wsd", "wsd (warm-up, stable, cosine decay at the end) or cosine")
    decay_frac: float = option(0.2, "wsd: fraction of the steps in the final decay")
    lr: float = option(3e-3, "peak learning rate")
    weight_decay: float = option(0.1, "decoupled weight decay")
    optimizer: str = option("muonclip", "muonclip, muon or adamw")
    qk_clip_tau: float = option(100.0, "QK-Clip threshold on the max attention logit (muonclip only)")
    bias_update_speed: float = option(1e-3, "router-bias step of the aux-loss-free load balancing")
    aux_loss_alpha: float = option(0.0, "sequence-wise balance loss weight (0: aux-loss-free only, as K2)")
    grad_clip: float = option(1.0, "max global gradient norm")
    bf16: bool = option(False, "bf16 autocast")
    qat: bool = option(False, "train with fake-quantized INT4 routed experts (QAT)")
    seed: int = option(0, "seed of the initialization and the data order")
    eval_every: int = option(50, "steps between held-out evaluations (and at the end)")
    save_every: int = option(0, "steps between checkpoints (0: only at the end)")

    CONTROL = ("max_steps", "save_every")  # may change between a run and its continuation
    # settings added after run directories were written, with the value that behaves as before (runs.claim)
    ADDED: typing.ClassVar[dict] = {}

    def check(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a positive multiple of grad_accum "
                             f"{self.grad_accum}; change --batch-size or --grad-accum")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose muonclip, muon or adamw")
        if self.eval_every < 1 or self.save_every < 0:
            raise ValueError(f"eval_every ({self.eval_every}) must be >= 1 and save_every ({self.save_every}) >= 0")
        check_schedule(schedule=self.schedule, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                       decay_frac=self.decay_frac)


@dataclass
class PretrainSettings(TrainSettings):
    preset: str = option("tiny", "model preset: tiny, small, kimi-k2, kimi-k2.5, kimi-k2.6")
    init_from: str | None = option(None, "start from this checkpoint's weights and config (the preset is ignored)")
    data: list[str] = field(default_factory=list, metadata={
        "help": "text or .jsonl files (default: the embedded corpus)"})
    tokenizer: str | None = option(None, "tokenizer directory (default: train one into RUN_DIR/tokenizer)")
    encyclopedia: float = option(0.0, "share of the training rows that are synthetic-encyclopedia articles about "
                                      "its seen entities (k2lab.data.encyclopedia), for calibration; 0: none")
    encyclopedia_qa: bool = option(False, "the encyclopedia articles of the entities post-training asks about end "
                                          "with those questions answered (\"Q: ... A: ...\"; mixed training); "
                                          "held-out entities' never do")
    encyclopedia_qa_format: str = option("text", "how --encyclopedia-qa writes those questions: text (\"Q: ... "
                                                 "A: ...\") or chat (the K2.6 chat format under the calibration "
                                                 "eval's system prompt: how post-training asks them)")
    encyclopedia_qa_entities: str = option("all", "whose questions --encyclopedia-qa mixes in: all the "
                                                  "post-training entities', or half (a fixed choice by name); with "
                                                  "half, post-training also asks about facts the model read but "
                                                  "was never asked about, as the held-out set does")
    copy_rows: float = option(0.0, "share of the training rows that are a random token sequence repeated "
                                   "(synthetic in-context copying data, k2lab.train.data.copy_rows); 0: none, "
                                   "1: nothing else (a copying warm-up)")
    tie_embeddings: bool = option(False, "tie the output head to the input embeddings (tie_word_embeddings; K2 "
                                         "unties them): one learned head then writes out whichever token it "
                                         "attends to (experiments/in_context_copying.py)")
    seq_len: int = option(128, "tokens per row")
    val_rows: int = option(32, "held-out rows, spread over the text training reads")
    run_dir: str = option("runs/pretrain", "run directory; a rerun resumes from its last checkpoint")

    CONTROL = (*TrainSettings.CONTROL, "run_dir")
    ADDED = {"encyclopedia_qa": False, "encyclopedia_qa_format": "text", "encyclopedia_qa_entities": "all",
             "copy_rows": 0.0, "tie_embeddings": False}

    def check(self) -> None:
        super().check()
        if self.seq_len < 2 or self.val_rows < 0:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 2 and val_rows ({self.val_rows}) >= 0")
        if self.tie_embeddings and self.init_from:
            raise ValueError("--tie-embeddings shapes a new model; with --init-from the checkpoint's config decides "
                             "(drop one of the two)")
        if not 0 <= self.encyclopedia < 1:
            raise ValueError(f"encyclopedia ({self.encyclopedia}) is a share of the training rows: give 0 <= x < 1")
        if self.encyclopedia_qa and not self.encyclopedia:
            raise ValueError("--encyclopedia-qa adds answered questions to the encyclopedia rows: give "
                             "--encyclopedia X (a share of the rows) too")
        if self.encyclopedia_qa_format not in QA_FORMATS:
            raise ValueError(f"unknown --encyclopedia-qa-format {self.encyclopedia_qa_format!r}; choose "
                             f"{' or '.join(QA_FORMATS)}")
        if self.encyclopedia_qa_format != "text" and not self.encyclopedia_qa:
            raise ValueError("--encyclopedia-qa-format says how --encyclopedia-qa writes its questions: give "
                             "--encyclopedia-qa too")
        if self.encyclopedia_qa_entities not in QA_ENTITIES:
            raise ValueError(f"unknown --encyclopedia-qa-entities {self.encyclopedia_qa_entities!r}; choose "
                             f"{' or '.join(QA_ENTITIES)}")
        if self.encyclopedia_qa_entities != "all" and not self.encyclopedia_qa:
            raise ValueError("--encyclopedia-qa-entities says whose questions --encyclopedia-qa mixes in: give "
                             "--encyclopedia-qa too")
        if not 0 <= self.copy_rows <= 1 or self.encyclopedia + self.copy_rows > 1:
            raise ValueError(f"copy_rows ({self.copy_rows}) is a share of the training rows: give 0 <= x and "
                             f"encyclopedia + copy_rows <= 1")

    def model_config(self) -> ModelConfig:
        if self.init_from:
            return ModelConfig.load(self.init_from)
        config = ModelConfig.preset(self.preset)
        return dataclasses.replace(config, tie_word_embeddings=True) if self.tie_embeddings else config

    def identity(self, config: ModelConfig) -> dict:
        """What makes two runs the same run: every setting but run control, and the model config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CONTROL}
        return {**d, "model": config.to_dict()}


@dataclass
class SftSettings(TrainSettings):
    """`k2lab sft`: fine-tune a checkpoint on chat JSONL (the loop's settings, with SFT's defaults)."""

    checkpoint: str | None = option(None, "checkpoint to start from (its weights, config and tokenizer)")
    data: list[str] = field(default_factory=list, metadata={
        "help": "chat JSONL files: {messages, tools} per line (e.g. k2lab synth's kept.jsonl)"})
    max_steps: int = option(300, "optimizer steps; a larger value continues a finished run")
    lr: float = option(1e-3, "peak learning rate")
    seq_len: int = option(1024, "tokens per packed row (longer conversations are left out)")
    val_fraction: float = option(0.1, "share of the conversations held out for the held-out loss and tool-call eval")
    eval_max_new_tokens: int = option(96, "tool-call eval: generation cap of requests that set no max_tokens")
    eval_toolcalls: str | None = option(None, "tool-call eval set: JSONL of `k2lab eval toolcalls` request bodies "
                                              "with expect (default: the held-out conversations' first turns)")
    thinking: bool = option(False, "render with K2.6 thinking on (reasoning trained) instead of off, as RL "
                                   "episodes render and eval requests ask with chat_template_kwargs")
    distill: bool = option(False, "with --qat: QAT by self-distillation, the loss is the KL from the starting "
                                  "checkpoint's next-token distributions (a frozen copy) instead of the cross-entropy "
                                  "of the data's tokens, and only the routed experts' weights train (no router-bias "
                                  "updates), so QAT recovers what quantizing loses without pulling the model toward "
                                  "the data")
    run_dir: str = option("runs/sft", "run directory; a rerun resumes from its last checkpoint")

    CONTROL = (*TrainSettings.CONTROL, "run_dir")
    ADDED = {"distill": False}

    def check(self) -> None:
        super().check()
        if not self.checkpoint:
            raise ValueError("pass --checkpoint DIR (the model to fine-tune)")
        if not self.data:
            raise ValueError("pass --data FILE (chat JSONL; repeat for several files)")
        if self.seq_len < 2 or not 0 <= self.val_fraction < 1 or self.eval_max_new_tokens < 1:
            raise ValueError(f"need seq_len >= 2 ({self.seq_len}), 0 <= val_fraction < 1 ({self.val_fraction}), "
                             f"eval_max_new_tokens >= 1 ({self.eval_max_new_tokens})")
        if self.distill and not self.qat:
            raise ValueError("--distill trains toward the starting checkpoint, which the model already is without "
                             "--qat; add --qat (QAT by self-distillation) or drop --distill")

    def identity(self) -> dict:
        """What makes two runs the same run: every setting but run control."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CONTROL}



# the domains of k2lab.synth.domains
RL_ENVS = ("arithmetic", "mental", "knowledge", "store", "files", "lookup", "coding", "toolbox")
RL_LOSSES = ("k15", "k25", "grpo")
RL_CALIBRATION_REWARDS = ("ternary", "brier")


@dataclass
class RLSettings(TrainSettings):
    """`k2lab rl`: batch_size is the trajectories per step, batch_size / samples prompts with K = samples each."""

    checkpoint: str = option("", "the policy to start from (a checkpoint directory with its tokenizer)")
    env: str = option("arithmetic", f"environments, comma-separated, tasks dealt round-robin: {', '.join(RL_ENVS)}")
    loss: str = option("k15", "k15 (the K1.5/K2 objective), k25 (token-level, log-ratio masking) or grpo")
    samples: int = option(4, "K: samples per prompt (each micro-batch holds whole groups)")
    tau: float = option(0.1, "k15/k25: weight of the log-ratio term")
    max_new_tokens: int = option(48, "per assistant turn; a turn cut at this budget is penalized")
    budget_penalty: float = option(0.5, "reward subtracted when a turn runs over max_new_tokens")
    max_turns: int = option(4, "assistant messages per episode at most")
    thinking: bool = option(False, "K2.6 thinking mode: the policy samples its reasoning in <think> before each "
                                   "answer (trained, and counted in the token budget; rewards read the answer)")
    calibration_reward: str = option("ternary", "knowledge tasks: ternary (correct +1, wrong -1, abstained 0) or "
                                                "brier (the prompt asks for 'Confidence: p'; 1 - (p - correct)^2, "
                                                "0.75 for abstaining)")
    wrong_reward: float = option(-1.0, "ternary calibration reward paid for a wrong answer (< 0): answering pays "
                                       "when P(correct) > w / (1 + w) for w = -this, so -1 answers above 50% and "
                                       "-0.5 above 33%")
    temperature_start: float = option(1.0, "sampling temperature at step 0 (cosine decay)")
    temperature_end: float = option(0.6, "sampling temperature at the last step")
    ptx_data: str = option("", "PTX: chat JSONL of curated conversations, their cross-entropy added (off if empty)")
    ptx_weight: float = option(0.1, "PTX: weight of that cross-entropy in the loss")
    ptx_seq_len: int = option(512, "PTX: tokens per packed row")
    ptx_rows: int = option(0, "PTX: packed rows a step (0: one per trajectory, --batch-size); fewer cost less, "
                              "e.g. one per prompt (--batch-size / --samples)")
    critic_url: str = option("", "self-critique rubric reward: OpenAI-compatible critic endpoint (off when empty)")
    critic_model: str = option("", "self-critique rubric reward: the critic's model name (default K2LAB_MODEL, "
                                   "else the endpoint's only model)")
    critic_weight: float = option(1.0, "self-critique rubric reward: weight of the group win rate in the reward")
    lr: float = option(3e-4, "peak learning rate")
    max_steps: int = option(50, "optimizer steps (one rollout batch each); a larger value continues a finished run")
    compile: bool = option(True, "decode rollouts through the compiled step (compiled once, cached across "
                                 "processes; repaid within a few rollout calls); --no-compile: eager")
    run_dir: str = option("runs/rl", "run directory; a rerun resumes from its last checkpoint")
    rollout_url: str = option("", "OpenAI-compatible server (…/v1) to roll out on instead of in process; started "
                                  "with --logprobs-mode processed_logprobs, reloading weights between steps")
    max_staleness: int = option(0, "server rollouts: policy versions the sampler may lag behind (weights reach "
                                   "it every max_staleness + 1 steps)")

    CONTROL = (*TrainSettings.CONTROL, "run_dir", "rollout_url")
    ADDED = {"thinking": False, "calibration_reward": "ternary", "wrong_reward": -1.0, "ptx_rows": 0}

    @property
    def envs(self) -> list[str]:
        return [e.strip() for e in self.env.split(",") if e.strip()]

    def check(self) -> None:
        super().check()
        if not self.checkpoint:
            raise ValueError("no --checkpoint given; pass the directory of the policy to train")
        unknown = [e for e in self.envs if e not in RL_ENVS]
        if unknown or not self.envs:
            raise ValueError(f"unknown environment(s) {unknown or [self.env]}; choose from {', '.join(RL_ENVS)}")
        if self.calibration_reward not in RL_CALIBRATION_REWARDS:
            raise ValueError(f"unknown --calibration-reward {self.calibration_reward!r}; choose ternary or brier")
        if not self.wrong_reward < 0:
            raise ValueError(f"--wrong-reward ({self.wrong_reward}) must be below 0: abstaining earns 0, so a wrong "
                             f"answer paid 0 or more would make guessing free")
        if self.loss not in RL_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose k15, k25 or grpo")
        if self.samples < 2 or (self.batch_size // self.grad_accum) % self.samples:
            raise ValueError(f"each micro-batch ({self.batch_size} // {self.grad_accum} rows) must hold whole groups "
                             f"of --samples {self.samples} >= 2; change --batch-size, --grad-accum or --samples")
        if self.max_staleness < 0 or (self.max_staleness and not self.rollout_url):
            raise ValueError(f"--max-staleness {self.max_staleness}: must be >= 0, and > 0 only with --rollout-url "
                             f"(in-process rollouts always use the current weights)")
        if self.ptx_data and self.ptx_weight <= 0:
            raise ValueError(f"--ptx-weight {self.ptx_weight}: must be > 0 with --ptx-data (leave out --ptx-data to "
                             "train without PTX)")
        if self.ptx_data and self.ptx_seq_len < 2:
            raise ValueError(f"--ptx-seq-len {self.ptx_seq_len}: must be >= 2 (tokens per packed PTX row)")
        if self.ptx_rows < 0 or self.ptx_rows % self.grad_accum:
            raise ValueError(f"--ptx-rows {self.ptx_rows}: must be 0 (one per trajectory) or a positive multiple of "
                             f"--grad-accum {self.grad_accum} (each micro-batch takes its share)")
        if self.ptx_data and not Path(self.ptx_data).is_file():
            raise ValueError(f"--ptx-data {self.ptx_data}: no such file; give chat JSONL (one conversation per line)")
        if self.max_new_tokens < 1 or self.max_turns < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) and max_turns ({self.max_turns}) must be >= 1")

    def identity(self, config: ModelConfig) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CONTROL}
        return {**d, "model": config.to_dict()}


def settings_fields(cls: type = PretrainSettings) -> list[tuple[dataclasses.Field, type, bool]]:
    """(field, scalar type, optional) of each field of a settings class, for the command-line parsers."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        optional = type(None) in typing.get_args(hints[f.name])
        out.append((f, args[0] if args else hints[f.name], optional))
    return out
