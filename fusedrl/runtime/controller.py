"""The distributed PPO trainer: the single controller of DESIGN.md's data flow.

:class:`DistributedPPOTrainer` is a :class:`~fusedrl.trainer.PPOTrainer` whose model
function calls run on Ray workers, each call on its own placement (``placement.*`` of
the config). The iteration itself (prompt order, scoring, token rewards, GAE,
whitening, KL control, metrics) is the reference trainer's ``step``, unchanged; this
class replaces where the calls run:

- generate on ``actor_gen`` (``generation.backend`` on stage 0 of each dp replica,
  requests ``j`` to replica ``j % dp``; vLLM: one engine per single-device replica,
  its weights loaded in place from the copy the reallocation engine filled),
- old log-probs on ``actor_train``, reference log-probs on ``ref``, values on
  ``critic_infer``, reward-model scores on ``reward`` (micro-batch ``k`` to dp rank
  ``k % dp``; the three inference calls run concurrently where their devices differ),
- actor and critic updates on ``actor_train``/``critic_train`` (same mini-batch
  shuffle and micro-batches as the reference, 1F1B per dp replica, summed gradients),
- then the new weights resharded ``actor_train -> actor_gen`` and
  ``critic_train -> critic_infer`` where those placements differ, by the reallocation
  engine (ReaLHF, arXiv 2406.14088; :mod:`fusedrl.runtime.reshard`): no full gather on
  one device, only bytes a destination lacks cross devices. Reported as
  ``timing_s/realloc`` (wall time of the sync, measured here) and ``perf/realloc_bytes``
  (bytes that crossed devices). The reference starts as a reshard of the loaded actor.
  With ``placement.keep_inference_copies: false`` the two inference copies are dropped
  before training and re-allocated by the sync (``perf/realloc_alloc_bytes``).

Token ids and per-token scalars travel through the controller as Ray objects; weights
and activations only between workers. Lifecycle: ``t = DistributedPPOTrainer(config)``
(validates placements against the model before starting any worker), ``t.step()``
per iteration, ``t.save_checkpoint(out)`` / ``t.load_checkpoint(path)``, ``t.close()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
import torch

from fusedrl.algorithms import ppo
from fusedrl.config import PLACEMENT_ROLES, ConfigError
from fusedrl.layout import Placement
from fusedrl.runtime.interstage import FusedRollout, interstage_enabled
from fusedrl.runtime.launch import check_gpus, ensure_ray, worker_options
from fusedrl.runtime.reshard import sync_pairs
from fusedrl.runtime.worker import RemoteWorker, RunSpec
from fusedrl.trainer import PPOTrainer, build_setup


def _model_config_of(path: str):
    from fusedrl.models.checkpoint import config_from_hf, load_checkpoint

    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return config_from_hf(json.loads((p / "config.json").read_text()), p / "config.json")
    return load_checkpoint(p)[0]


def check_placements(config, model_config, reward_config=None) -> dict[str, Placement]:
    """Resolve every call's placement and check it against the cluster and the model;
    a :class:`ConfigError` naming the key otherwise."""
    from fusedrl.runtime.groups import check_tp_order

    out = {}
    for role in PLACEMENT_ROLES:
        key = role if getattr(config.placement, role) else "default"
        p = config.placement.of(role)
        mc = reward_config if role == "reward" else model_config
        try:
            p.check_cluster(config.cluster.devices)
            if mc is not None:
                p.layout.check_model(mc)
            check_tp_order(p, key)
        except ValueError as e:
            raise ConfigError(f"config key placement.{key}={p}: {e}") from None
        out[role] = p
    return out


def check_backend(config, gen_placement: Placement) -> None:
    """A generation backend other than the native engine runs one engine per
    ``actor_gen`` replica, on that replica's single device (vLLM inside a worker sets up
    its distributed state on that device alone: ``vllm_backend._vllm_world``)."""
    name = config.generation.backend
    if name == "native":
        return
    key = "placement.actor_gen" if config.placement.actor_gen else "placement.default"
    if gen_placement.layout.tp != 1 or gen_placement.layout.pp != 1:
        raise ConfigError(f"config key {key}={gen_placement}: generation.backend={name!r} "
                          f"runs one engine per device in the Ray runtime: use tp1pp1 (dp "
                          f"replicas) for actor_gen, or the native engine")


class RemoteModel:
    """Stands for a model whose shards live on workers (the reference ``step`` switches
    train/eval modes; the sharded Llama has no mode-dependent layers)."""

    def __init__(self, role: str):
        self.role = role

    def eval(self) -> "RemoteModel":
        return self

    def train(self, mode: bool = True) -> "RemoteModel":
        return self


class _Generation:
    """The engine interface of the reference trainer, over the ``actor_gen`` workers."""

    def __init__(self, trainer: "DistributedPPOTrainer"):
        self.t = trainer

    def generate(self, requests, params):
        dp = self.t.placements["actor_gen"].layout.dp
        by_dp = [requests[d::dp] for d in range(dp)]
        outs = self.t._run("actor_gen", "generate", "actor_gen", by_dp, params)
        done = {s.sample_id: s for out in outs if out for s in out}
        return [done[r.sample_id] for r in requests]

    def update_weights(self) -> None:
        """Nothing here: the workers' backends load new weights in
        :meth:`DistributedPPOTrainer.sync_weights`, after the reallocation."""


class DistributedPPOTrainer(PPOTrainer):
    """PPO with every model function call on its own placement of Ray workers."""

    def __init__(self, config, setup=None):
        from fusedrl.models.hub import resolve_model_path

        self.config = config
        self.setup = setup or build_setup(config)
        c, s = config, self.setup
        reward_config = reward_path = None
        if c.reward.type == "model":
            reward_path = str(resolve_model_path(c.reward.model_path))
            reward_config = _model_config_of(reward_path)
        self.placements = check_placements(c, s.model_config, reward_config)
        check_backend(c, self.placements["actor_gen"])
        roles = [r for r in PLACEMENT_ROLES if (r != "reward" or reward_config is not None)
                 and r != "actor_infer"]
        spec = RunSpec(
            config=c, model_config=s.model_config, reward_config=reward_config,
            placements={r: str(self.placements[r]) for r in roles},
            actor_path=str(resolve_model_path(c.model.path)) if c.model.path else "",
            critic_path=str(resolve_model_path(c.model.critic_path)) if c.model.critic_path
            else "",
            reward_path=reward_path or "", eos_token_ids=tuple(s.tokenizer.eos_token_ids),
            pad_token_id=s.tokenizer.pad_token_id, roles=tuple(roles))
        self.spec = spec
        # Workers load their own shards; the controller keeps no weights.
        s.actor_state = s.critic_state = None
        self.kl_ctl = (ppo.AdaptiveKLController(c.ppo.kl_coef, c.ppo.target_kl, c.ppo.kl_horizon)
                       if c.ppo.adaptive_kl else ppo.FixedKLController(c.ppo.kl_coef))
        self.iteration = 0
        self.reward_model = None  # rule rewards: the reference score(); model: see score()
        self.actor, self.critic = RemoteModel("actor_train"), RemoteModel("critic_train")
        self.engine = _Generation(self)
        # Inter-stage fusion (RLHFuse §4): generation streams into inference, the long
        # tail migrates; infer()/score() then take the results computed during generate.
        fuse_rollout = interstage_enabled(c, self.placements, reward_config is not None)
        self.rollout = None  # built once the workers hold their weights (below)
        self.fused_training = None  # intra-stage fusion (RLHFuse §5), built on first use

        self._owns_ray = ensure_ray(c.cluster.address, c.cluster.devices)
        n, acc = c.cluster.devices, c.cluster.accelerator
        try:
            check_gpus(c.cluster, ray.cluster_resources())
            self.workers = [RemoteWorker.options(**worker_options(acc)).remote(d, n, acc)
                            for d in range(n)]
            host, port = ray.get(self.workers[0].address.remote())
            ray.get([w.init_distributed.remote(host, port) for w in self.workers])
            ray.get([w.setup.remote(spec) for w in self.workers])
            self.init_pairs, self.step_pairs = sync_pairs(spec.placements, roles)
            self.sync_weights(self.init_pairs + self.step_pairs)
            if fuse_rollout:  # measures the generation devices' free memory (its C)
                self.rollout = self.engine = FusedRollout(self)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ dispatch

    def _devices(self, *roles: str) -> list[int]:
        return sorted({d for r in roles for d in self.placements[r].devices})

    def _submit(self, role: str, method: str, *args, devices=None):
        devices = devices if devices is not None else self._devices(role)
        return [getattr(self.workers[d], method).remote(*args) for d in devices]

    def _run(self, role: str, method: str, *args):
        return ray.get(self._submit(role, method, *args))

    @staticmethod
    def _ordered(outs) -> list:
        """Per-micro-batch results of all dp replicas, in micro-batch order."""
        pairs = sorted((k, r) for out in outs if out for k, r in out)
        return [r for _, r in pairs]

    # ------------------------------------------------------------ calls

    def score(self, batch, records):
        if self.spec.reward_config is None:
            return super().score(batch, records)
        if self.rollout is not None and self.rollout.holds(batch):
            return self.rollout.take_scores(batch)
        micros = self._micro_indices(len(batch))
        ref = ray.put(batch)
        return torch.cat(self._ordered(self._run("reward", "infer", "reward", "score", ref,
                                                 micros, 1.0)))

    def infer(self, batch):
        if self.rollout is not None and self.rollout.holds(batch):
            return self.rollout.take_infer(batch)
        temp = self.config.generation.temperature
        micros = self._micro_indices(len(batch))
        ref = ray.put(batch)
        futures = [self._submit(role, "infer", role, kind, ref, micros, temp)
                   for role, kind in (("actor_train", "logp"), ("ref", "logp"),
                                      ("critic_infer", "values"))]
        return tuple(torch.cat(self._ordered(ray.get(f))) for f in futures)

    def train(self, batch, old_logp, old_values, advantages, returns) -> dict:
        self.release_inference_copies()  # generation and inference are over
        c = self.config.ppo
        gen = torch.Generator().manual_seed(self.config.trainer.seed * 7919 + self.iteration)
        schedule = []  # the reference's shuffle: per mini-batch, its micro-batch indices
        for _ in range(c.ppo_epochs):
            perm = torch.randperm(len(batch), generator=gen)
            for start in range(0, len(batch), c.mini_batch_size):
                mini = perm[start:start + c.mini_batch_size]
                schedule.append([mini[k:k + c.micro_batch_size]
                                 for k in range(0, len(mini), c.micro_batch_size)])
        bref = ray.put(batch)
        data = ray.put({"old_logp": old_logp, "values": old_values, "advantages": advantages,
                        "returns": returns})
        extra: dict[str, float] = {}
        if self.config.fusion.intrastage:  # one fused schedule for both (RLHFuse §5)
            if self.fused_training is None:
                from fusedrl.runtime.fused_train import FusedTraining

                self.fused_training = FusedTraining(self)
            results, extra = self.fused_training.train(bref, data, schedule)
        else:
            futures = {kind: self._submit(role, "train", role, kind, bref, data, schedule)
                       for kind, role in (("actor", "actor_train"), ("critic", "critic_train"))}
            results = {kind: ray.get(f) for kind, f in futures.items()}
        stats: dict[str, list[float]] = {}
        for kind, res in results.items():
            outs = [o for o in res if o]
            for _, _, st in sorted((m, k, st) for o in outs for m, k, st in o["micro"]):
                for key, v in st.items():
                    stats.setdefault(key, []).append(v)
            stats[f"{kind}/grad_norm"] = outs[0]["grad_norm"]
        return {**{k: sum(v) / len(v) for k, v in stats.items()}, **extra}

    def sync_weights(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """Reshard each ``(src, dst)`` pair's weights into ``dst`` through the reallocation
        engine, submitted once to every device of any pair (each worker runs the pairs it
        belongs to, in order; pairs on disjoint devices proceed concurrently). Then each
        ``actor_gen`` device loads its copy into a generation backend that keeps its own
        weights (vLLM), in place on that device (``Worker.refresh_generation``).

        Returns ``perf/realloc_bytes`` (bytes that crossed devices),
        ``perf/realloc_alloc_bytes`` (storage re-allocated for dropped copies) and
        ``timing_s/realloc_backend_load`` (the slowest replica's load into its backend;
        0 for the native engine).
        """
        outs = []
        if pairs:
            roles = sorted({r for pair in pairs for r in pair})
            outs = ray.get(self._submit("", "sync_weights", pairs,
                                        devices=self._devices(*roles)))
        # A backend with its own weights (vLLM) loads them from the copy on its device;
        # the native engine generates with that copy (no round trip to the workers).
        load_s = [0.0]
        if self.config.generation.backend != "native":
            load_s = ray.get(self._submit("actor_gen", "refresh_generation", "actor_gen"))
        return {"perf/realloc_bytes": sum(o["bytes_received"] for o in outs),
                "perf/realloc_alloc_bytes": sum(o["bytes_allocated"] for o in outs),
                "timing_s/realloc_backend_load": max(load_s)}

    def release_inference_copies(self) -> None:
        """Drop the inference-only copies (``placement.keep_inference_copies: false``) once
        generation and inference are done, so that training has their memory (ReaLHF)."""
        if self.config.placement.keep_inference_copies:
            return
        ray.get([f for _, dst in self.step_pairs
                 for f in self._submit(dst, "release_weights", dst)])

    def step(self) -> dict:
        metrics = super().step()
        if self.rollout is not None:  # fused gen/inference spans replace the stage times
            metrics.update(self.rollout.metrics())
        t0 = time.perf_counter()
        moved = self.sync_weights(self.step_pairs)
        dt = time.perf_counter() - t0
        metrics["timing_s/realloc"] = dt
        metrics["timing_s/step"] += dt
        metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / metrics["timing_s/step"]
        metrics.update(moved)
        return metrics

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Controller state; optimizer shards are written by the workers (save_checkpoint)."""
        return {"iteration": self.iteration, "kl_ctl": self.kl_ctl.state_dict(),
                "torch_rng": torch.get_rng_state(), "placements": self.spec.placements}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self, out: Path) -> Path:
        """``out/checkpoints/iter_N/``: Hugging Face ``actor/`` and ``critic/`` (gathered
        and written by the training placements' rank 0; the directory must be reachable
        from those workers, i.e. shared storage on a multi-node cluster), per-rank
        optimizer shards in ``optim/`` and ``trainer_state.pt``; written atomically."""
        from fusedrl.checkpointing import checkpoint_dir
        from fusedrl.models.checkpoint import atomic_dir

        final = checkpoint_dir(Path(out), self.iteration)
        with atomic_dir(final) as tmp:
            (tmp / "optim").mkdir()
            for role, name in (("actor_train", "actor"), ("critic_train", "critic")):
                ray.get(self._submit(role, "save_model", role, str(tmp / name)))
                ray.get([self.workers[d].save_optimizer.remote(
                    role, str(tmp / "optim" / f"{role}_device{d}.pt"))
                    for d in self._devices(role)])
            tok = self.setup.tokenizer
            if hasattr(tok, "save_pretrained"):
                tok.save_pretrained(str(tmp / "actor"))
            torch.save(self.state_dict(), tmp / "trainer_state.pt")
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore the trained weights (each worker reads its shard) and reshard them to
        the inference copies, optimizer shards (the run must use the placements it was
        saved with), KL controller, RNG and iteration. The reference keeps the initial
        actor it was resharded from at setup."""
        path = Path(path)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state.get("placements") != self.spec.placements:
            raise ConfigError(f"{path}: saved with placements {state.get('placements')}, this "
                              f"run uses {self.spec.placements}; resume with the same placement.*")
        for role, name in (("actor_train", "actor"), ("critic_train", "critic")):
            ray.get(self._submit(role, "load_model", role, str(path / name)))
            ray.get([self.workers[d].load_optimizer.remote(
                role, str(path / "optim" / f"{role}_device{d}.pt"))
                for d in self._devices(role)])
        self.sync_weights(self.step_pairs)  # the reference stays the initial actor
        self.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers (and Ray, if this trainer started it)."""
        if getattr(self, "workers", None):
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
            except Exception:  # a dead worker must not hide the run's own error
                pass
            for w in self.workers:
                ray.kill(w)
            self.workers = []
        if getattr(self, "_owns_ray", False):
            ray.shutdown()
            self._owns_ray = False
