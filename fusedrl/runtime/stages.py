"""The Ray runtime's stages (:mod:`fusedrl.stages`), every model call on its own placement:

- :class:`RayRollout` (``ray``): generation on the ``actor_gen`` replicas (requests
  ``j`` to replica ``j % dp``), then the inference calls -- old log-probs on
  ``actor_infer``, reference log-probs on ``ref``, values on ``critic_infer``,
  reward-model scores on ``reward`` -- concurrently where their devices differ
  (micro-batch ``k`` to dp rank ``k % dp``);
- :class:`RayUpdate` (``1f1b``, ``fused``): the actor's and the critic's PPO epochs on
  their training placements with the shared mini-batch loop (same shuffle and
  micro-batches as on one device, 1F1B per dp replica, summed gradients), or both in
  one fused pipeline schedule (RLHFuse §5, :mod:`fusedrl.intrastage`);
- :class:`ReallocSync` (``realloc``): after each update the new weights resharded
  ``actor_train -> actor_gen / actor_infer`` and ``critic_train -> critic_infer`` where
  those placements differ, by the reallocation engine (ReaLHF, arXiv 2406.14088): no
  full gather on one device, only bytes a destination lacks cross devices. With
  ``placement.keep_inference_copies: false`` the inference copies are dropped before
  training and re-allocated by the sync (``perf/realloc_alloc_bytes``).
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from fusedrl.rollout import RolloutBatch
from fusedrl.stages import RolloutOutput, StageContext, register_stage
from fusedrl.update import inference_micro_batches, merge_update_stats, unpermute

INFERENCE_CALLS = (("actor_infer", "logp"), ("ref", "logp"), ("critic_infer", "values"),
                   ("reward", "score"))
"""The inference calls of an iteration, ``(role, kind)``."""


def inference_calls(roles) -> tuple[tuple[str, str], ...]:
    """The inference calls of a run with ``roles`` (no critic: no values; no reward
    model: no scores)."""
    return tuple(call for call in INFERENCE_CALLS if call[0] in roles)


def ordered(outs) -> list:
    """Per-micro-batch results of all dp replicas, in micro-batch order."""
    return [r for _, r in sorted(((k, r) for out in outs if out for k, r in out),
                                 key=lambda x: x[0])]


class RayRollout:
    """Generate on ``actor_gen``, then infer on each call's placement."""

    def __init__(self, cluster, config, setup):
        self.cluster, self.config, self.setup = cluster, config, setup
        self.calls = inference_calls(cluster.spec.roles)

    def run(self, requests, params) -> RolloutOutput:
        batch = RolloutBatch.from_samples(self.generate(requests, params),
                                          self.setup.tokenizer.pad_token_id)
        res = self.infer(batch)
        return RolloutOutput(batch, res["actor_infer", "logp"], res["ref", "logp"],
                             res.get(("critic_infer", "values")), res.get(("reward", "score")))

    def generate(self, requests, params) -> list:
        """Samples of ``requests`` (in their order), request ``j`` on replica ``j % dp``."""
        cl = self.cluster
        dp = cl.placements["actor_gen"].layout.dp
        outs = cl.run("actor_gen", "generate", "actor_gen", [requests[d::dp] for d in range(dp)],
                      params)
        done = {s.sample_id: s for out in outs if out for s in out}
        return [done[r.sample_id] for r in requests]

    def infer(self, batch: RolloutBatch) -> dict[tuple[str, str], torch.Tensor]:
        """``{(role, kind): result}`` of every inference call on ``batch``, the calls
        submitted together (concurrent where their devices differ)."""
        cl = self.cluster
        micros = inference_micro_batches(batch, self.config.ppo)
        ref = ray.put(batch)
        temp = self.config.generation.temperature
        futures = {(role, kind): cl.submit(role, "infer", role, kind, ref, micros, temp)
                   for role, kind in self.calls}
        return {call: unpermute(ordered(ray.get(f)), micros) for call, f in futures.items()}

    def close(self) -> None:
        """The workers stop with the cluster."""


class RayUpdate:
    """PPO epochs of actor and critic on their training placements; ``fused``: in one
    fused pipeline schedule per mini-batch (RLHFuse §5)."""

    def __init__(self, cluster, config, fused: bool):
        self.cluster, self.config = cluster, config
        self.name = "fused" if fused and cluster.has_critic else "1f1b"
        self.fused = None
        if fused and cluster.has_critic:
            from fusedrl.intrastage import FusedTraining

            self.fused = FusedTraining(cluster)

    def trained(self) -> list[tuple[str, str]]:
        """``(model, training role)`` of the trained models (no critic: the actor)."""
        return [(n, r) for n, r in (("actor", "actor_train"), ("critic", "critic_train"))
                if r in self.cluster.spec.roles]

    def train(self, batch, targets, schedule) -> dict:
        cl = self.cluster
        bref, tref = ray.put(batch), ray.put(targets)
        extra: dict[str, float] = {}
        if self.fused is not None:  # one fused schedule for both (RLHFuse §5)
            results, extra = self.fused.train(bref, tref, schedule)
        else:
            futures = {name: cl.submit(role, "train", [name], bref, tref, schedule)
                       for name, role in self.trained()}
            results = {name: [o[name] if o else None for o in ray.get(f)]
                       for name, f in futures.items()}
        return {**merge_update_stats(results), **extra}

    def save(self, directory: Path, tokenizer) -> dict:
        """Hugging Face ``actor/`` and ``critic/`` (gathered and written by each training
        placement's rank 0; the directory must be reachable from those workers, i.e.
        shared storage on a multi-node cluster) and per-rank optimizer shards in
        ``optim/``."""
        cl = self.cluster
        (directory / "optim").mkdir()
        for name, role in self.trained():
            cl.run(role, "save_model", role, str(directory / name))
            ray.get([cl.workers[d].save_optimizer.remote(
                role, str(directory / "optim" / f"{role}_device{d}.pt"))
                for d in cl.devices_of(role)])
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(directory / "actor"))
        return {}

    def load(self, directory: Path, state: dict) -> None:
        """Each worker reads its shard of the weights and its optimizer shard (the run
        must use the placements it was saved with: checked by the caller)."""
        cl = self.cluster
        for name, role in self.trained():
            cl.run(role, "load_model", role, str(directory / name))
            ray.get([cl.workers[d].load_optimizer.remote(
                role, str(directory / "optim" / f"{role}_device{d}.pt"))
                for d in cl.devices_of(role)])

    def close(self) -> None:
        """The workers stop with the cluster."""


class ReallocSync:
    """The reallocation engine after every update (module docstring). The reference
    keeps the initial actor it was resharded from at setup."""

    def __init__(self, cluster, config):
        self.cluster, self.config = cluster, config
        self.stale_copies: set[str] = set()
        """One-device copies (inter-stage fusion) whose weights changed since filled."""

    def before_update(self) -> None:
        """Drop the inference-only copies (``placement.keep_inference_copies: false``) once
        generation and inference are done, so that training has their memory (ReaLHF)."""
        cl = self.cluster
        if self.config.placement.keep_inference_copies:
            return
        copies = sorted(k for k in cl.serve_fresh if cl.spec.serve[k][1] != "actor_gen")
        cl.release([dst for _, dst in cl.step_pairs] + copies)
        cl.serve_fresh.difference_update(copies)

    def after_update(self) -> dict:
        cl = self.cluster
        metrics = cl.sync(cl.step_pairs)
        # the one-device copies of trained models hold the previous weights now
        for key, (role, src, _) in cl.spec.serve.items():
            if src != "actor_gen" and (role in ("actor_infer", "critic_infer")
                                       or not self.config.placement.keep_inference_copies):
                cl.serve_fresh.discard(key)
        return metrics

    def after_load(self) -> None:
        cl = self.cluster
        cl.sync(cl.step_pairs)
        cl.serve_fresh.clear()


@register_stage("rollout", "ray")
def _ray_rollout(ctx: StageContext):
    return RayRollout(ctx.cluster, ctx.config, ctx.setup)


@register_stage("update", "1f1b")
def _ray_update(ctx: StageContext):
    return RayUpdate(ctx.cluster, ctx.config, fused=False)


@register_stage("update", "fused")
def _fused_update(ctx: StageContext):
    return RayUpdate(ctx.cluster, ctx.config, fused=True)


@register_stage("weight_sync", "realloc")
def _realloc(ctx: StageContext):
    return ReallocSync(ctx.cluster, ctx.config)
