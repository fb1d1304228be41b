"""The Ray workers of a run, one per device, and the dispatch of model calls to them:
the single controller of docs/design.md's data flow. The stages (:mod:`fusedrl.runtime.stages`,
:mod:`fusedrl.interstage`) drive the workers through it.

Lifecycle::

    cluster = RayCluster(config, setup, serve=...)  # placements checked against the model
                                                    # before any worker starts; workers
                                                    # started, shards loaded, copies made
    cluster.submit(role, method, *args) / cluster.run(...)
    cluster.sync(pairs)          # reallocation engine (ReaLHF) for (src, dst) pairs
    cluster.take_events()        # every device's model-call events (fusedrl.timeline)
    cluster.close()              # workers stopped; Ray too if this run started it

Token ids and per-token scalars travel through the controller as Ray objects; weights
and activations only between workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from fusedrl.config import PLACEMENT_ROLES, ConfigError
from fusedrl.layout import Placement
from fusedrl.runtime.launch import check_gpus, ensure_ray, worker_options
from fusedrl.realloc.weight_sync import sync_pairs
from fusedrl.runtime.worker import RemoteWorker, RunSpec


def model_config_of(path: str):
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
        if role == "actor_infer" and not config.placement.actor_infer:
            key = "actor_train" if config.placement.actor_train else "default"
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


class RayCluster:
    """Workers, placements and the dispatch of calls (module docstring).

    ``serve``: build the one-device inference copies that inter-stage fusion fills on
    freed generation devices (:func:`fusedrl.interstage.serve_copies`).
    """

    def __init__(self, config, setup, serve: bool = False):
        from fusedrl.models.hub import resolve_model_path

        self.config, self.setup = config, setup
        c, s = config, setup
        reward_config = reward_path = None
        if c.reward.type == "model":
            reward_path = str(resolve_model_path(c.reward.model_path))
            reward_config = model_config_of(reward_path)
        self.placements = check_placements(c, s.model_config, reward_config)
        check_backend(c, self.placements["actor_gen"])
        from fusedrl.validate import uses_critic

        self.has_critic = uses_critic(c)  # critic-free: no critic built, placed or synced
        roles = [r for r in PLACEMENT_ROLES if (r != "reward" or reward_config is not None)
                 and (self.has_critic or r not in ("critic_train", "critic_infer"))]
        placements = {r: str(self.placements[r]) for r in roles}
        copies = {}
        if serve:
            from fusedrl.interstage import serve_copies

            copies = serve_copies(c, placements, roles)
        self.spec = RunSpec(
            config=c, model_config=s.model_config, reward_config=reward_config,
            placements=placements,
            actor_path=str(resolve_model_path(c.model.path)) if c.model.path else "",
            critic_path=str(resolve_model_path(c.model.critic_path)) if c.model.critic_path
            else "",
            reward_path=reward_path or "", eos_token_ids=tuple(s.tokenizer.eos_token_ids),
            pad_token_id=s.tokenizer.pad_token_id, roles=tuple(roles), serve=copies)
        # Workers load their own shards; the controller keeps no weights.
        s.actor_state = s.critic_state = None
        self.init_pairs, self.step_pairs = sync_pairs(placements, roles)
        self.serve_fresh: set[str] = set()
        """One-device copies (``spec.serve``) holding the current weights."""
        self.devices = list(range(c.cluster.devices))
        self._owns_ray = ensure_ray(c.cluster.address, c.cluster.devices)
        n, acc = c.cluster.devices, c.cluster.accelerator
        self.workers = []
        try:
            check_gpus(c.cluster, ray.cluster_resources())
            self.workers = [RemoteWorker.options(**worker_options(acc)).remote(d, n, acc)
                            for d in range(n)]
            host, port = ray.get(self.workers[0].address.remote())
            ray.get([w.init_distributed.remote(host, port) for w in self.workers])
            ray.get([w.setup.remote(self.spec) for w in self.workers])
            self.sync(self.init_pairs + self.step_pairs)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ dispatch

    def devices_of(self, *roles: str) -> list[int]:
        """Devices of the placements of ``roles`` (roles or one-device copy keys)."""
        out = set()
        for r in roles:
            if r in self.spec.serve:
                out.add(self.spec.serve[r][2])
            else:
                out.update(self.placements[r].devices)
        return sorted(out)

    def submit(self, role: str, method: str, *args, devices=None) -> list:
        devices = devices if devices is not None else self.devices_of(role)
        return [getattr(self.workers[d], method).remote(*args) for d in devices]

    def run(self, role: str, method: str, *args, devices=None) -> list:
        return ray.get(self.submit(role, method, *args, devices=devices))

    def sync_futures(self, pairs: list[tuple[str, str]]) -> list:
        """Submit the reallocation of ``pairs`` to every device of any of them (each
        worker runs the pairs it belongs to, in order); the futures."""
        roles = sorted({r for pair in pairs for r in pair})
        return self.submit("", "sync_weights", pairs, devices=self.devices_of(*roles))

    def sync(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """Reshard each ``(src, dst)`` pair's weights into ``dst`` through the
        reallocation engine (pairs on disjoint devices proceed concurrently); then each
        ``actor_gen`` device whose backend keeps its own weights (vLLM) loads them from
        its copy, in place (``Worker.refresh_generation``).

        Returns ``perf/realloc_bytes`` (bytes that crossed devices),
        ``perf/realloc_alloc_bytes`` (storage re-allocated for dropped copies) and
        ``timing_s/realloc_backend_load`` (the slowest replica's load into its backend;
        0 for the native engine).
        """
        outs = ray.get(self.sync_futures(pairs)) if pairs else []
        load_s = [0.0]
        if self.config.generation.backend != "native":
            load_s = self.run("actor_gen", "refresh_generation", "actor_gen")
        return {"perf/realloc_bytes": sum(o["bytes_received"] for o in outs),
                "perf/realloc_alloc_bytes": sum(o["bytes_allocated"] for o in outs),
                "timing_s/realloc_backend_load": max(load_s)}

    def release(self, keys) -> None:
        """Drop the inference-only copies ``keys`` on their devices until their next
        sync (``Worker.release_weights``)."""
        ray.get([f for k in keys for f in self.submit(k, "release_weights", k)])

    def device_of_actor(self, actor_id: str) -> int | None:
        """The device whose worker is the Ray actor ``actor_id`` (hex), or None."""
        for d, w in enumerate(self.workers):
            if w._actor_id.hex() == actor_id:
                return d
        return None

    def roles_on(self, device: int) -> list[str]:
        """The roles (and one-device copies) placed on ``device``."""
        return [r for r in (*self.spec.roles, *self.spec.serve) if device in self.devices_of(r)]

    def peak_memory(self) -> dict[str, float]:
        """The largest peak over the workers, per memory metric."""
        out: dict[str, float] = {}
        for m in ray.get([w.peak_memory.remote() for w in self.workers]):
            for k, v in m.items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    def take_events(self) -> list:
        return [e for evs in ray.get([w.take_events.remote() for w in self.workers])
                for e in evs]

    def close(self) -> None:
        """Stop the workers (and Ray, if this run started it)."""
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
