"""The Ray actor of one device: holds this device's shards of every model whose
placement includes it, and runs its part of each model function call.

Lifecycle (driven by :class:`fusedrl.runtime.cluster.RayCluster` and the stages)::

    w = RemoteWorker.options(**worker_options(accelerator)).remote(device, world_size,
                                                                  accelerator)
    w.init_distributed.remote(host, port)        # all workers: one world, rank = device
    w.setup.remote(spec)                         # all workers: groups, model shards, optimizers
    ... generate / infer / train / sync_weights / save_model  (called on every device of
        the call's placement, in the same order on each, so collectives line up)
    w.shutdown.remote()

A Ray actor runs one method at a time, in submission order; the controller submits a
call to all its workers before the next call, so two calls sharing devices never
interleave their collectives.

Device (``cluster.accelerator``; :mod:`fusedrl.devices`): on ``cpu`` a worker is one core
and its world is gloo; on ``cuda`` Ray gives it one GPU (``num_gpus=1``,
:func:`fusedrl.runtime.launch.worker_options`), it makes that GPU its current device and
its world uses ``cpu:gloo,cuda:nccl``. Its shards, optimizer state, pipeline and
reallocation buffers live on that device; what the controller sends (rollout batches,
PPO targets) is moved there on arrival and inference results go back on the CPU (Ray
objects). :meth:`Worker.device_memory` reports the device's free memory for the two
schedulers that size themselves by it (RLHFuse §4's ``C``, §5's memory cap).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import ray
import torch

from fusedrl.roles import FROZEN_ROLES, ROLES, heads
from fusedrl.interstage.worker import InterStageWorker
from fusedrl.timeline import EventLog

ALIASES = {r.value: s.source.value for r, s in ROLES.items() if s.refresh == "step"}
"""A call placed exactly like its training counterpart uses the training copy itself."""
TRAIN_ROLE = {"actor": "actor_train", "critic": "critic_train"}
FROZEN = frozenset(str(r) for r in FROZEN_ROLES)
"""Roles held in ``model.frozen_dtype`` and computed in ``model.frozen_compute_dtype``."""


@dataclass
class RunSpec:
    """What every worker needs to build its shards (picklable, sent once)."""

    config: object  # fusedrl.config.Config
    model_config: object  # ModelConfig of actor/ref/critic
    reward_config: object | None
    placements: dict[str, str]  # role -> placement text, defaults resolved
    actor_path: str = ""  # resolved checkpoint path ("" = from scratch with the seed)
    critic_path: str = ""
    reward_path: str = ""
    eos_token_ids: tuple = ()
    pad_token_id: int = 0
    roles: tuple = field(default=())  # roles with a model in this run
    serve: dict = field(default_factory=dict)
    """Inter-stage fusion: copy key (``ref@1``) -> ``(role, source key, device)`` of the
    one-device inference copies that freed generation devices receive
    (:func:`fusedrl.interstage.serve_copies`)."""


@dataclass
class Shard:
    """One model on this device: its stage module, groups and (if trained) optimizer."""

    role: str
    head: str
    model: torch.nn.Module
    groups: object
    optimizer: torch.optim.Optimizer | None = None
    reducer: object | None = None
    engine: object | None = None
    proxy: object | None = None
    serve_cache: object | None = None


def event_name(role: str, kind: str) -> str:
    """The timeline's name of an inference call (``logp:ref``, ``values``, ``score``)."""
    role = role.split("@")[0]  # a one-device copy (``ref@1``) counts as its role
    return f"logp:{role}" if kind == "logp" else kind


class ShardTrainable:
    """A trained model's shard on this worker as :class:`fusedrl.update.Trainable`:
    gradients all-reduced over data-parallel replicas (overlapped with the last
    backward, :class:`fusedrl.runtime.grads.GradReducer`), the norm over all shards."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.tp_group = shard.model.tp_group

    def zero_grad(self) -> None:
        self.shard.reducer.zero_grad()

    def reduce_grads(self) -> None:
        self.shard.reducer.finish()

    def clip_grad_norm(self, max_norm: float) -> float:
        from fusedrl.runtime.grads import clip_grad_norm

        return clip_grad_norm(self.shard.model, self.shard.groups, max_norm)

    def step(self) -> None:
        self.shard.optimizer.step()


class Worker(InterStageWorker):
    def __init__(self, device: int, world_size: int, accelerator: str = "cpu"):
        from fusedrl.devices import worker_device

        torch.set_num_threads(1)  # one device = one core (docs/design.md "Measuring")
        from fusedrl.runtime.heap import keep_freed_memory

        keep_freed_memory()  # activations reuse heap pages, no page faults per task
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import warnings

        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        self.device = device  # world rank = device id
        self.world_size = world_size
        self.accelerator = accelerator
        self.torch_device = worker_device(accelerator)  # where this worker's tensors live
        self.shards: dict[str, Shard] = {}
        from fusedrl.devices import synchronize

        self.events = EventLog(device, synchronize=lambda: synchronize(self.torch_device))

    # --------------------------------------------------------------- lifecycle

    def address(self) -> tuple[str, int]:
        """Host and a free port for the rendezvous store (asked of device 0)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def init_distributed(self, host: str, port: int) -> None:
        import torch.distributed as dist

        from datetime import timedelta

        from fusedrl.devices import collective_backend

        # A finite timeout turns a mismatched collective into an error instead of a hang.
        dist.init_process_group(collective_backend(self.accelerator),
                                init_method=f"tcp://{host}:{port}", rank=self.device,
                                world_size=self.world_size, timeout=timedelta(minutes=10))

    def device_memory(self) -> tuple[int, int]:
        """``(free, total)`` bytes of this worker's device
        (:func:`fusedrl.runtime.memory.device_memory`), less the generation engines'
        weight copies still to be built here. On CPU the workers share the
        host's RAM, one ``world_size``-th each (all on one host, as a local Ray
        instance runs them); on CUDA the GPU is this worker's alone, and blocks the
        caching allocator holds unused are returned first so that they count as free."""
        from fusedrl.runtime.memory import device_memory

        from fusedrl.runtime.memory import pending_generation_bytes

        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
        share = self.world_size if self.torch_device.type == "cpu" else 1
        free, total = device_memory(self.torch_device, share=share)
        # The generation engines' weight copies (fast path, packed weights) not built
        # yet are taken already: counted against the total, not found missing later.
        gen = self.shards.get("actor_gen")
        pending = (pending_generation_bytes(gen.model, self.spec.config, gen.engine)
                   if gen is not None else 0)
        return max(0, free - pending), total

    def setup(self, spec: RunSpec) -> None:
        from fusedrl.devices import collective_backend
        from fusedrl.layout import Placement
        from fusedrl.models.build import TORCH_DTYPES
        from fusedrl.runtime.groups import (GroupRegistry, pipeline_channels, placement_groups,
                                            rank_lists)
        from fusedrl.realloc.weight_sync import WeightSync, sync_pairs

        # The user's plug-ins (registries are per process): before anything is built by
        # a registered name (generation backend, policy, reward, advantage estimator).
        from fusedrl.plugins import load_plugins

        load_plugins(getattr(spec.config, "plugins", ()))
        self.spec = spec
        c = spec.config
        dtype = TORCH_DTYPES[c.model.dtype]
        self.placements = {r: Placement.parse(t) for r, t in spec.placements.items()}
        role_head = {str(r): h for r, h in heads().items()}
        for key, (role, src, dev) in spec.serve.items():  # one-device inference copies
            self.placements[key] = Placement.parse(f"dp1tp1pp1@{dev}")
            role_head[key] = role_head[role]
        self.role_head = role_head
        # Frozen models (reference, reward) and their one-device copies are held in
        # model.frozen_dtype; the reallocation engine converts the reference's init copy.
        frozen = [k for k in self.placements if self._role_of(k) in FROZEN]
        self.dtypes = {k: TORCH_DTYPES[c.model.frozen_dtype] if k in frozen else dtype
                       for k in self.placements}
        self.registry = GroupRegistry(self.device, collective_backend(self.accelerator))
        # Reallocation plans and executors of every weight copy the run makes (ReaLHF),
        # built once; their groups join the global list below.
        init_pairs, step_pairs = sync_pairs(spec.placements, spec.roles)
        # a copy whose source is the generation copy on the same device is that copy
        serve_pairs = [(src, key) for key, (_, src, _) in spec.serve.items()
                       if src != "actor_gen"]
        self.weight_sync = WeightSync(init_pairs + step_pairs + serve_pairs, self.placements,
                                      {k: self._config_of(k) for k in self.placements},
                                      role_head, self.device, self.dtypes, self.registry.get,
                                      lossless=frozen)
        synced = {dst for _, dst in init_pairs + step_pairs}  # weights come from the engine
        # The same list on every worker, in the same order (see groups.py).
        self.registry.create_all(rank_lists(
            [(self.placements[k], self._config_of(k)) for k in (*spec.roles, *spec.serve)],
            self.world_size, self.weight_sync.group_rank_lists()),
            pipeline_channels([self.placements[r] for r in spec.roles]))

        full_cache: dict = {}
        for role in spec.roles:
            p = self.placements[role]
            if p.rank_of(self.device) is None:
                continue
            if self.is_alias(role):
                self.shards[role] = self.shards[ALIASES[role]]
                continue
            mc = spec.reward_config if role == "reward" else spec.model_config
            groups = placement_groups(self.registry, p, self.device, mc)
            model = self._build(role, mc, p, groups, self.dtypes[role], full_cache,
                                load=role not in synced)
            shard = Shard(role, role_head[role], model, groups)
            if role in ("actor_train", "critic_train"):
                from fusedrl.runtime.grads import GradReducer

                lr = c.ppo.actor_lr if role == "actor_train" else c.ppo.critic_lr
                from fusedrl.optim import build_optimizer

                seed = c.trainer.seed + (role == "critic_train")
                shard.optimizer = build_optimizer(model.parameters(), lr, c.ppo.weight_decay,
                                                  c.ppo.optimizer_state_dtype, seed)
                model.gradient_checkpointing = c.model.gradient_checkpointing
                shard.reducer = GradReducer(model, groups)
            else:
                model.requires_grad_(False)
            self.shards[role] = shard
        from fusedrl.realloc.weight_sync import free_storage

        for key, (role, src, dev) in spec.serve.items():
            if dev != self.device or src == "actor_gen":
                continue
            p = self.placements[key]
            mc = self._config_of(key)
            groups = placement_groups(self.registry, p, self.device, mc)
            model = self._build(role, mc, p, groups, self.dtypes[key], full_cache, load=False)
            model.requires_grad_(False)
            free_storage(model)  # until a freed generation device receives the weights
            self.shards[key] = Shard(key, role_head[key], model, groups)

    def _role_of(self, key: str) -> str:
        """The role of a role or one-device copy key."""
        return self.spec.serve[key][0] if key in self.spec.serve else key

    def _config_of(self, key: str):
        """Model config of a role or copy key (the reward model has its own)."""
        return self.spec.reward_config if self._role_of(key) == "reward" \
            else self.spec.model_config

    def _inference_copy(self, role: str) -> Shard | None:
        """``role``'s shard on this device when it is an inference-only copy whose storage
        may be dropped (not the trainable module, nor an alias of it)."""
        shard = self.shards.get(role)
        if shard is None or shard.optimizer is not None or self.is_alias(role):
            return None
        return shard

    def is_alias(self, role: str) -> bool:
        return role in ALIASES and self.spec.placements[role] == \
            self.spec.placements[ALIASES[role]]

    def _build(self, role, mc, p, groups, dtype, full_cache, load: bool = True):
        """This device's stage of ``role``, with its shard of the initial weights loaded
        (``load=False``: left as initialised, the reallocation engine fills it)."""
        from fusedrl.models.build import TORCH_DTYPES, build_model, resolve_compute_dtype
        from fusedrl.models.llama import StageSpec
        from fusedrl.models.sharding import stage_layers
        from fusedrl.runtime.weights import full_initial_state, load_into, load_shard

        c, spec = self.spec.config, self.spec
        L, coord = p.layout, groups.coord
        head = self.role_head[role]
        stage = StageSpec(stage_layers(mc.num_layers, L.pp)[coord.pp], coord.pp == 0,
                          coord.pp == L.pp - 1)
        compute = (resolve_compute_dtype(dtype, self.torch_device, c.model.frozen_compute_dtype)
                   if role in FROZEN else None)
        model = build_model(mc, head, None, seed=c.trainer.seed, stage=stage,
                            tp_group=groups.tp_group, dtype=dtype, device=self.torch_device,
                            compute_dtype=compute)
        if not load:
            return model
        # Same sources and seeds as the single-device PPOTrainer.
        if role == "reward":
            path, seed = spec.reward_path, 0
        elif head == "value":
            path, seed = spec.critic_path or spec.actor_path, c.trainer.seed + 1
        else:
            path, seed = spec.actor_path, c.trainer.seed
        if path:
            shard = load_shard(path, mc, L, groups.rank, head)
        else:
            key = (head, seed)
            if key not in full_cache:
                # drawn in the training dtype for every role (a frozen copy converts
                # it on load): a seed gives one set of weights
                full_cache[key] = full_initial_state(mc, head, seed, TORCH_DTYPES[c.model.dtype],
                                                     self.registry.get([self.device]))
            from fusedrl.models.sharding import shard_state_dict

            shard = shard_state_dict(full_cache[key], mc, L, groups.rank, head)
        load_into(model, shard)
        return model

    def shutdown(self) -> None:
        import torch.distributed as dist

        for shard in self.shards.values():
            if shard.engine is not None:
                shard.engine.stop()
                shard.engine = None

        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------- calls

    def _reporting(self, shard: Shard) -> bool:
        """The rank that returns a replica's results: last stage, tp rank 0."""
        return shard.groups.is_last and shard.groups.coord.tp == 0

    def _mine(self, shard: Shard, micros: list, batch) -> list[tuple[int, torch.Tensor]]:
        """This dp rank's micro-batches ``(k, rows)``: the ranks' computed tokens (packed
        or padded) balanced (:func:`fusedrl.update.dp_micro_batches`, the same on every
        rank)."""
        from fusedrl.update import dp_micro_batches, seq_lengths

        dp, d = shard.groups.placement.layout.dp, shard.groups.coord.dp
        return dp_micro_batches(micros, seq_lengths(batch), dp,
                                self.spec.config.ppo.packed)[d]

    def generation_backend(self, role: str):
        """The generation backend (``generation.backend``) of this device's stage-0 rank of
        ``role``, built on first use from the weights the shard holds then."""
        from fusedrl.generation.backend import backend_from_config
        from fusedrl.pipeline.generate import StageProxy

        shard = self.shards[role]
        if shard.engine is None:
            g, c = shard.groups, self.spec.config
            if not g.is_last:
                shard.proxy = StageProxy(shard.model, g)
            shard.engine = backend_from_config(
                c, shard.proxy or shard.model, eos_token_ids=self.spec.eos_token_ids,
                pad_token_id=self.spec.pad_token_id,
                process_group=self.registry.get([self.device]))
        return shard.engine

    def generate(self, role: str, requests_by_dp: list, params):
        """Generate this dp replica's requests; returns its samples on stage 0, tp rank 0."""
        from fusedrl.pipeline.generate import serve

        shard = self.shards[role]
        g = shard.groups
        c = self.spec.config
        if not g.is_first:
            if shard.serve_cache is None:
                max_len = c.data.max_prompt_len + c.generation.max_new_tokens
                shard.serve_cache = shard.model.new_cache(c.generation.max_batch_size, max_len)
            with self.events.record("gen"):
                serve(shard.model, g, shard.serve_cache)
            return None
        backend = self.generation_backend(role)
        try:
            with self.events.record("gen"):
                samples = backend.generate(requests_by_dp[g.coord.dp], params)
        finally:
            if shard.proxy is not None:
                shard.proxy.stop()
        return samples if g.coord.tp == 0 else None

    def refresh_generation(self, role: str) -> float:
        """Load the weights that training or :meth:`sync_weights` just left in ``role``'s
        copy on this device into a generation backend that keeps its own (vLLM:
        ``update_weights`` in place, nothing crosses devices), building the backend on
        the first call; then drop that copy's storage, which only stages weights for
        the backend (:meth:`sync_weights` re-allocates it). Seconds taken; 0 for the
        native engine, which generates with the copy itself."""
        from fusedrl.realloc.weight_sync import free_storage

        shard = self.shards.get(role)
        if shard is None or self.spec.config.generation.backend == "native":
            return 0.0
        t0 = time.perf_counter()
        if shard.engine is None:
            self.generation_backend(role)
        else:
            shard.engine.update_weights()
        if self._inference_copy(role) is not None:
            free_storage(shard.model)
        return time.perf_counter() - t0

    def infer(self, role: str, kind: str, batch, micros: list, temperature: float):
        """Pipelined forward of this replica's micro-batches; ``[(k, result)]`` from the
        reporting rank (``kind``: logp, values or score)."""
        from fusedrl.devices import to_device, to_host
        from fusedrl.packing import model_input, select
        from fusedrl.pipeline.schedule import pipelined_forward
        from fusedrl.rollout import infer_head

        # indices too, as the single-device trainer does (no host-to-device copy per use)
        batch, micros = to_device((batch, micros), self.torch_device)
        shard = self.shards[role]
        mine = self._mine(shard, micros, batch)
        packed = self.spec.config.ppo.packed
        mbs = [select(batch, idx, packed) for _, idx in mine]
        width = batch.response_mask.shape[1]
        tp_group = shard.model.tp_group
        with self.events.record(event_name(role, kind)):
            results = pipelined_forward(
                shard.model, shard.groups, [model_input(mb) for mb in mbs],
                lambda out, i: infer_head(kind, out, mbs[i], tp_group, width, temperature))
        if not self._reporting(shard):
            return None
        return to_host([(k, r) for (k, _), r in zip(mine, results)])

    def train(self, names: list[str], batch, targets: dict, schedule: list[list],
              fused: tuple | None = None) -> dict:
        """PPO updates of ``names`` (``actor``/``critic``) with the shared mini-batch loop
        (:func:`fusedrl.update.run_update`): per mini-batch, 1F1B over this replica's
        micro-batches of each model in turn, or (``fused = (stage_map, plans)``) both
        models in one fused pipeline schedule (RLHFuse §5,
        :func:`fusedrl.intrastage.fused_forward_backward`); then gradient
        all-reduce, clip, step.

        Returns ``{name: {"micro": [(mini, k, stats, weight)], "grad_norm": [...]} or None}``
        (None where this worker is not the model's reporting rank).
        """
        from fusedrl.devices import to_device
        from fusedrl.packing import model_input, select
        from fusedrl.pipeline.schedule import train_1f1b
        from fusedrl.update import run_update

        batch, targets, schedule = to_device((batch, targets, schedule), self.torch_device)
        c = self.spec.config
        shards = {name: self.shards[TRAIN_ROLE[name]] for name in names}
        models = {name: ShardTrainable(shard) for name, shard in shards.items()}

        def forward_backward(m, micros, loss):
            work = {}
            for name, shard in shards.items():
                mine = self._mine(shard, micros, batch)
                mbs = [select(batch, idx, c.ppo.packed) for _, idx in mine]
                work[name] = (mine, mbs, lambda out, i, name=name, mine=mine, mbs=mbs:
                              loss(name, out, mbs[i], mine[i][1], mine[i][0]))
            if fused is not None:
                from fusedrl.intrastage.training import fused_forward_backward

                fused_forward_backward(self, shards, work, *fused)
                return
            for name, shard in shards.items():
                mine, mbs, loss_fn = work[name]
                g = shard.groups
                with self.events.record(f"train:{name}"):
                    train_1f1b(shard.model, g, [model_input(mb) for mb in mbs], loss_fn,
                               shard.reducer.arm if g.dp_group is not None else None)

        out = run_update(schedule, models, forward_backward, targets, c,
                         c.generation.temperature)
        return {name: out[name] if self._reporting(shard) else None
                for name, shard in shards.items()}

    def profile_fused(self, batch, idx):
        """Stage times of actor_train and critic_train on one micro-batch (fused
        training, :mod:`fusedrl.intrastage`)."""
        from fusedrl.intrastage.training import worker_profile

        return worker_profile(self, batch, idx)

    def peak_memory(self) -> dict[str, float]:
        """This worker's peak memory (:func:`fusedrl.devices.peak_memory_metrics`)."""
        from fusedrl.devices import peak_memory_metrics

        return peak_memory_metrics(self.torch_device)

    def take_events(self) -> list:
        """This device's model-call events since the last call (:mod:`fusedrl.timeline`)."""
        return self.events.take()

    # ----------------------------------------------------------------- weights

    def sync_weights(self, pairs: list[tuple[str, str]]) -> dict:
        """Reshard each ``(src, dst)`` pair's weights into ``dst`` through the reallocation
        engine (:mod:`fusedrl.realloc.weight_sync`), re-allocating a dropped copy first.

        Called on every device of any pair's placements with the same list; this device
        takes part in the pairs it belongs to, in list order. Returns this device's
        ``{"bytes_received", "bytes_sent", "bytes_allocated", "seconds"}``.
        """
        from fusedrl.realloc.weight_sync import restore_storage

        out = {"bytes_received": 0, "bytes_sent": 0, "bytes_allocated": 0, "seconds": 0.0}
        t0 = time.time()
        for src, dst in pairs:
            s, d = self.shards.get(src), self.shards.get(dst)
            if d is not None:
                out["bytes_allocated"] += restore_storage(d.model)
            stats = self.weight_sync.run(src, dst, s.model if s else None,
                                         d.model if d else None)
            if stats is not None:
                out["bytes_received"] += stats.bytes_received
                out["bytes_sent"] += stats.bytes_sent
                out["seconds"] += stats.seconds
        if out["seconds"]:
            self.events.add("realloc", t0, time.time())
        return out

    def release_weights(self, role: str) -> int:
        """Drop this device's inference-only copy of ``role`` (parameter storage and the
        generation engine with its KV cache) until the next :meth:`sync_weights`; returns
        the parameter bytes freed."""
        from fusedrl.realloc.weight_sync import free_storage

        shard = self._inference_copy(role)
        if shard is None:
            return 0  # not here, or the trainable module itself: never dropped
        if shard.engine is not None:
            shard.engine.release()  # kept: building a backend (vLLM) is expensive
        shard.serve_cache = None
        return free_storage(shard.model)

    def save_model(self, role: str, directory: str) -> bool:
        """Write a normal Hugging Face checkpoint of ``role`` into ``directory`` (on the
        placement's rank 0, after gathering); True where it was written."""
        from pathlib import Path

        from fusedrl.models.checkpoint import save_hf_checkpoint
        from fusedrl.runtime.weights import gather_full

        shard = self.shards[role]
        full = gather_full(shard.model, shard.groups, shard.head)
        if full is None:
            return False
        save_hf_checkpoint(Path(directory), shard.model.config, full, shard.head)
        return True

    def load_model(self, role: str, directory: str) -> None:
        """Load this rank's shard of a checkpoint into ``role`` (and its alias)."""
        from fusedrl.runtime.weights import load_into, load_shard

        shard = self.shards[role]
        g = shard.groups
        load_into(shard.model, load_shard(directory, shard.model.config, g.placement.layout,
                                          g.rank, shard.head))

    def save_optimizer(self, role: str, path: str) -> None:
        """This rank's optimizer shard (only meaningful for the same placement on resume)."""
        torch.save(self.shards[role].optimizer.state_dict(), path)

    def load_optimizer(self, role: str, path: str) -> None:
        self.shards[role].optimizer.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=False))

    def ping(self) -> int:
        return self.device


RemoteWorker = ray.remote(Worker)
