"""Where an RL step's trajectories come from: the backend, the weight sync, the split over torchrun ranks and
the staleness bound. `k2lab.train.rl.run` asks `Rollouts.play(step, temperature)` once per optimizer step.

Backends (one generator interface, k2lab.train.rl.episodes.Generator):
- in process (default): `InProcessGenerator` on the policy itself (one process), so every step samples with
  the current weights and the weight sync is a no-op; under torchrun the sharded policy's full weights are
  gathered into a plain replica on every rank each step (`distributed.full_model`), because FSDP and expert
  parallelism make each forward a collective and ranks sampling different lengths cannot share forwards;
- an OpenAI-compatible server (`--rollout-url`, `RemoteGenerator`): rank 0 saves the policy to
  RUN_DIR/policy/step-N and the server reloads it (SGLang's POST /update_weights_from_disk) before rolling out.

Ranks and determinism: the step's groups are rolled out in world x grad_accum chunks, one per micro-batch of
the loop (each holds whole groups of K), chunk c seeded by (seed, step, c); rank r plays the chunks whose rows
the loop gives it (`distributed.my_shares`), and the trajectories and grades are gathered so every rank holds
the step's whole batch in the one-process order. A chunk's episodes depend on the chunk, not on the rank that
plays it, so N processes log what 1 process logs with the same micro-batches (grad_accum x N).

Staleness (server only): with --max-staleness S the server gets new weights at the steps that are multiples of
S + 1, so step t samples with the policy of step t - t % (S + 1), at most S versions old (a pure function of
the step, so a resumed run syncs as the uninterrupted one did; the weights of that version stay in
RUN_DIR/policy until a newer one is loaded). Each trajectory carries the version it was sampled with and its
log-probs under that policy; the losses take them as the old policy, which is the importance correction: k15
regresses on log(pi / pi_sampler) (the K1.5 mirror-descent step is taken from the policy that sampled), k25
weights each token by exp(log pi - log pi_sampler) and masks tokens whose log-ratio left [alpha, beta], grpo
clips the same ratio. Metrics: staleness_mean / staleness_max, and the log-ratio statistics show the drift.
"""

from __future__ import annotations

import shutil
from pathlib import Path


from k2lab.runs import atomic_dir
from k2lab.serve.rollout import InProcessGenerator, RolloutParams
from k2lab.serve.rollout_client import RemoteGenerator
from k2lab.synth.domains import make_tasks
from k2lab.train import distributed as dist_utils
from k2lab.train.rl.episodes import run_episodes, sub_seed
from k2lab.train.settings import RLSettings


class Rollouts:
    def __init__(self, s: RLSettings, tokenizer, context: int, run_dir: Path):
        self.s, self.tokenizer, self.context, self.run_dir = s, tokenizer, context, Path(run_dir)
        self.eos = tuple(i for i in (tokenizer.im_end_id, tokenizer.eos_id) if i is not None)
        self.rank, self.world, _ = dist_utils.setup()
        self.chunks = self.world * s.grad_accum
        groups = s.batch_size // s.samples
        if (s.batch_size // self.chunks) % s.samples:
            raise ValueError(f"each micro-batch ({s.batch_size} rows over {self.world} ranks x grad_accum "
                             f"{s.grad_accum}) must hold whole groups of --samples {s.samples}; change "
                             f"--batch-size, --grad-accum or the number of processes")
        self.groups_per_chunk = groups // self.chunks
        self.remote = RemoteGenerator(s.rollout_url) if s.rollout_url else None
        self.server_version: int | None = None  # the version the server holds (None: unknown, sync first)
        self.model = self.current = None

    def attach(self, model) -> None:
        """The policy being trained (the loop's on_model, before sharding)."""
        self.model = model

    def play(self, step: int, temperature: float, timings: dict | None = None):
        """(trajectories, grades, the current policy as a plain model on this rank) for the step's whole batch;
        `timings` gets this rank's seconds sampling, stepping environments and scoring (run_episodes' keys)."""
        fresh = self.current is None
        self.current = dist_utils.full_model(self.model, self.current)  # collective under torchrun
        if fresh and self.s.qat and self.current is not self.model:  # the replica samples as the policy trains
            from k2lab.quant.qat import enable_qat_

            enable_qat_(self.current)
        generator = self._generator(step)
        tasks = make_tasks(self.s.envs, self.s.batch_size // self.s.samples,
                           seed=sub_seed(self.s.seed, "tasks", step))
        params = RolloutParams(max_new_tokens=self.s.max_new_tokens, temperature=temperature)
        mine = []
        for c in dist_utils.my_shares(self.chunks):
            part = tasks[c * self.groups_per_chunk:(c + 1) * self.groups_per_chunk]
            clock: dict = {}
            mine.append(run_episodes(generator, self.tokenizer, part, self.s.samples, params, self.s.max_turns,
                                     self.context, self.s.budget_penalty, seed=sub_seed(self.s.seed, "rollout", step, c),
                                     timings=clock, thinking=self.s.thinking, calibration=self.s.calibration_reward,
                                     wrong_reward=self.s.wrong_reward))
            if timings is not None:
                for key, sec in clock.items():
                    timings[key] = timings.get(key, 0.0) + sec
        played = dist_utils.gather_objects(mine)
        return [t for trajs, _ in played for t in trajs], [g for _, grades in played for g in grades], self.current

    def _generator(self, step: int):
        if self.remote is None:  # the model itself (or its replica): the current weights, version = step
            return InProcessGenerator(self.current, self.eos, policy_version=step, compile=self.s.compile)
        version = step - step % (self.s.max_staleness + 1)
        if version != self.server_version:
            path = self.run_dir / "policy" / f"step-{version:06d}"
            if self.rank == 0:
                if version == step:
                    import k2lab

                    with atomic_dir(path) as tmp:
                        k2lab.save_model(self.current, tmp)
                elif not (path / "config.json").is_file():
                    raise ValueError(f"{path} is missing: the weights the server must sample with at step {step} "
                                     f"(--max-staleness {self.s.max_staleness}); rerun with --max-staleness 0")
                self.remote.update_weights(str(path.resolve()))
                for old in path.parent.glob("step-*"):  # keep only the version the server holds
                    if old.name < path.name:
                        shutil.rmtree(old)
            dist_utils.barrier()  # no rank rolls out before the server holds the new weights
            self.server_version = version
        self.remote.policy_version = version
        return self.remote


def staleness(trajs, step: int) -> dict:
    """How many optimizer steps behind the current policy the step's trajectories were sampled."""
    lag = [step - t.policy_version for t in trajs]
    return {"staleness_mean": sum(lag) / len(lag), "staleness_max": max(lag)}
