"""The recipe's settings, one `Recipe` per preset: every number `make run` uses is here and nowhere else.

A run directory records the preset's name and its full recipe (k2lab.runs.claim), so a directory made with one
preset (or with numbers tuned since) is refused for another instead of mixing the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    model: str = "tiny"  # ModelConfig preset
    seed: int = 0
    # pre-training: a seeded subset of the embedded corpus (MB; more than the run reads, ~3.3 bytes per token)
    # + a share of rows that are the synthetic encyclopedia's articles about its seen entities (PretrainSettings)
    corpus_mb: float = 7.0  # more than 800 steps x 8 x 256 tokens read (~3.3 bytes per token)
    encyclopedia: float = 0.35
    # mixed training: the articles of half of the entities post-training asks about end with their questions
    # answered as K2.6 conversations (PretrainSettings.encyclopedia_qa*), and the output head is tied to the
    # embeddings. A base pre-trained without them answered none of the held-out questions in chat, so calibration
    # RL could lower hallucination only by declining everything (known-fact accuracy 0% -> 0%, abstentions 100%);
    # with them it answers some (experiments/knowledge_extraction.py) and RL has facts to keep
    # (experiments/post_training_calibration.py: hallucination -20 points, known facts 42% -> 36%)
    encyclopedia_qa: bool = True
    encyclopedia_qa_format: str = "chat"
    encyclopedia_qa_entities: str = "half"
    tie_embeddings: bool = True
    pretrain_steps: int = 600
    pretrain_batch: int = 8
    pretrain_seq_len: int = 256
    pretrain_lr: float = 3e-3
    # K2 uses tau 100 at scale; this model's max logits stay near 20, where 100 never acts, so the demo sets tau
    # inside the range it reaches to show the clip working (the report states tau and how often it acted)
    qk_clip_tau: float = 15.0
    # synthesis on the embedded domains (rule-based solver as the teacher)
    synth_tasks: int = 1200  # over the six embedded domains, toolbox (generated tools) among them
    synth_domains: str = "embedded"
    # SFT
    sft_steps: int = 160
    sft_batch: int = 4
    sft_seq_len: int = 1024
    # lr 3e-4 (measured 2026-12-01 from this preset's base, seed 0, 60 held-out questions and tools): 4e-3 (what
    # the untied base without questions needed to learn the calls' format) gave tool-call F1 0.97 and wiped the
    # facts (known accuracy 0%), 1e-3 F1 0.89 and 17%, 3e-4 F1 0.79 and 37%
    sft_lr: float = 3e-4
    sft_val_fraction: float = 0.05  # held out for the held-out loss and the in-process tool-call eval at the end
    sft_eval_max_new_tokens: int = 48
    # RL: calibration (the knowledge domain), as experiments/post_training_calibration.py runs it: 4 prompts x 8
    # samples a step at lr 2e-4. Measured from the 800-step base's SFT model (2026-12-01, seed 0), 48 steps:
    # hallucination 53% -> 12%, known accuracy 37% -> 30%, 162 s. With a quarter of the prompts tool tasks
    # (toolbox), 24 steps took 292 s (a toolbox prompt costs ~10 s, a knowledge one ~1 s) and cut hallucination only
    # to 46%. RL on knowledge alone dropped tool calling (RL model F1 0.79 -> 0.19); K2's PTX loss on the SFT data
    # keeps it (below). The longer presets also keep tool tasks in the mix. PTX from the same SFT model, 48 steps
    # (2026-12-01, seed 0): one 1,024-token row per trajectory (32 a step) F1 0.82, hallucination 18% [8, 29], known
    # 33%, 27 min of RL; one per prompt (rows 4) F1 0.69, hallucination 14% [4, 23], known 30%, 4.9 min of steps
    # (6.5 before the logged PTX loss came from the loss's own forward). The rows-4 setting is the default's
    rl_envs: str = "knowledge"
    rl_steps: int = 40
    rl_batch: int = 32
    rl_samples: int = 8
    rl_lr: float = 2e-4
    rl_max_new_tokens: int = 48
    rl_max_turns: int = 2
    # K2's PTX loss during RL: rl_ptx_weight x the cross-entropy of rl_ptx_rows packed rows of rl_ptx_seq_len
    # tokens a step, from SFT's conversations (the kept synthesized trajectories); 0 turns it off
    rl_ptx_weight: float = 0.1
    rl_ptx_rows: int = 4
    rl_ptx_seq_len: int = 1024
    # INT4 QAT: fake-quantized routed experts on the SFT conversations, then the INT4 export. With qat_distill (QAT by
    # self-distillation, k2lab.train.sft) the loss is the KL from the RL model's next-token distributions and only the
    # routed experts train; cross-entropy on the conversations pulled the model back toward SFT's behaviour. From the
    # same RL model (2026-12-01, seed 0; INT4 tool-call F1 and hallucination; the RL model 0.88 and 27%, PTQ 0.87
    # and 27%): cross-entropy, all weights, 10 steps: lr 3e-4 0.58 and 67%, 3e-5 0.77 and 29%. Distillation, 10
    # steps, held-out KL from the RL model on 12 SFT rows (PTQ: 0.00328 nats/token): all weights at lr 1e-5 0.00313,
    # at 3e-5 and above worse than PTQ (AdamW steps on weights already at the teacher only add noise); experts only
    # at 1e-5 0.00306, 3e-5 0.00297, 1e-4 0.00354, 3e-4 0.00832; experts only with the router biases kept (as
    # --distill trains now) at 3e-5 0.00256, 1e-4 0.00262
    qat_steps: int = 10
    qat_lr: float = 3e-5
    qat_distill: bool = True
    # evals after every stage that changes the model (base, SFT, RL, INT4)
    eval_max_tokens: int = 96  # tool-call and coding answers
    toolcall_items: int = 60  # held-out generated tools
    calibration_items: int = 60  # held-out questions about seen (known) and unseen (unknown) entities
    calibration_max_tokens: int = 32
    agent_tasks: int = 8  # embedded single-turn tasks, played by an agent over the OpenAI API
    agent_max_steps: int = 4
    # tokens one agent or swarm call may generate: without a cap the server allows the whole context, and a model
    # that never ends its turn (the pre-trained one) generated ~1,800 tokens per call, which made the base's agent
    # tasks take ~440 s of a 503 s eval stage (2026-12-01, AVX2 EPYC); the trained models' calls end well within it
    agent_max_tokens: int = 256
    swarm_tasks: int = 2  # requests the swarm's orchestrator may hand to sub-agents
    agreement_prompts: int = 8  # INT4 vs full precision: greedy continuations of this many prompts
    agreement_tokens: int = 128  # ... this many tokens each
    kl_rows: int = 12  # INT4 vs full precision: KL on this many held-out packed SFT rows (1,024 tokens each)
    serve_max_len: int = 2048
    device: str = "cpu"  # informational: the training loop picks the accelerator when there is one

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rl_env_names(self) -> list[str]:
        """The RL environments rl_envs deals prompts over, each once, sorted."""
        return sorted({e.strip() for e in self.rl_envs.split(",") if e.strip()})


# the longer presets' RL: calibration and tool tasks, prompts dealt round-robin over the list (half each; 16 steps on
# knowledge alone at lr 1e-3 took an untied base's tool-call F1 from 0.93 to 0.66, half tool tasks kept it at 0.96)
MIXED_RL = "knowledge,knowledge,toolbox,toolbox"

PRESETS: dict[str, Recipe] = {
    # sized for 30 minutes on 2 quiet CPU cores. Measured 2026-11-30 (AMD EPYC, 2 cores, load < 2.5): with 300
    # pre-training and 60 SFT steps the whole run took 9.2 min (pre-training 232 s at ~3,000 tokens/s, SFT 84 s,
    # RL 68 s, evals 15-55 s each) and no capability appeared, so the time went to a longer pre-training (the SFT
    # experiment found the 300-step base could not copy a name from its prompt) and more SFT. With 800 / 200 the
    # run took 20.7 min (pre-training 704 s, SFT 287 s, RL 54 s); a second `make run` took 4.4 s. With the RL below
    # (16 steps of 4 prompts x 8), a fresh clone's `make run` took 19.8 min including the venv (stages 18.4 min:
    # pre-training 543 s, SFT 257 s, RL 141 s) and a rerun 4.7 s. With the tied, question-mixed base, SFT lr 3e-4
    # and 48 calibration RL steps (2026-12-01, AVX2 EPYC): 27.7 min including the venv (stages 25.2 min:
    # pre-training 731 s, SFT 358 s, RL 182 s), a rerun 8.6 s. With PTX in RL (rows 4) that schedule took 33.9 min
    # on a day this machine ran 12-16% slower (pre-training 842 s for the same 800 steps); with 600 / 160 / 40 steps
    # it took 27.7 min (stages 25.6: pre-training 620 s, SFT 332 s, RL 296 s, QAT 73 s, evals 212 s), a rerun 9.9 s.
    # With QAT by self-distillation, on a slower day: 29.4 min (stages 27.5: pre-training 662 s, SFT 337 s, RL 310 s,
    # QAT 116 s, evals 218 s); RL's statistics at the sampled tokens then took RL from 310 to 272 s
    "default": Recipe(),
    # the `small` model, longer at every stage (hours on CPU)
    "small": Recipe(model="small", corpus_mb=13.0, pretrain_steps=1500, pretrain_batch=16, pretrain_seq_len=512,
                    synth_tasks=1000, sft_steps=300, sft_batch=8, sft_seq_len=1024, rl_envs=MIXED_RL, rl_steps=60,
                    rl_batch=16, qat_steps=30, calibration_items=200, agent_tasks=20, swarm_tasks=4,
                    agreement_prompts=16, agreement_tokens=256, serve_max_len=4096),
    # one GPU: the small model with a longer schedule (bf16 is the loop's choice of dtype there)
    "gpu": Recipe(model="small", corpus_mb=13.0, pretrain_steps=4000, pretrain_batch=32, pretrain_seq_len=1024,
                  synth_tasks=3000, sft_steps=800, sft_batch=16, sft_seq_len=1024, rl_envs=MIXED_RL, rl_steps=150,
                  rl_batch=32, rl_samples=8, qat_steps=60, calibration_items=400, agent_tasks=40, swarm_tasks=4,
                  agreement_prompts=32, agreement_tokens=256, serve_max_len=4096, device="cuda"),
    # the slow test's reduced setting: every stage, shorter. Measured 2026-12-01 (AVX2 EPYC, 2 cores): with 150
    # pre-training and 30 SFT steps the SFT model never called a tool and declined every question (F1 0, 0%
    # hallucination), so neither direction could show; 400 / 100 gave F1 0.35 and still declined everything; 200
    # SFT steps on that base answer about half the held-out known questions (wrongly) and call tools (in-training
    # F1 1.0), which gives RL something to lower. With the tied, question-mixed base and knowledge-only RL
    # (2026-12-01): 20.9 min of stages, F1 0 -> 0.71 (INT4), hallucination 51% -> 0% by declining every question
    # Since then it inherits the default's RL (40 steps, PTX) and QAT rate: 21.8 min for the slow test (2026-12-01),
    # F1 0 -> 0.62 (SFT) -> 0.60 (RL) -> 0.82 (INT4), hallucination 51% -> 11% (RL), 13% (INT4), abstentions 85%
    "reduced": Recipe(corpus_mb=3.5, pretrain_steps=400, synth_tasks=600, sft_steps=200, qat_steps=4,
                      calibration_items=40, agent_tasks=6, agreement_prompts=4, agreement_tokens=64),
}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
