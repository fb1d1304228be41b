"""Weights reaching every call's placement through the reallocation engine.

ReaLHF (Mei et al., arXiv 2406.14088, "parameter reallocation") runs each model function
call on its own placement and reshards the weights between them, with no full gather on
one device and moving only what each destination device does not already hold. In a run
that means these source -> destination pairs (:func:`sync_pairs`), in this order:

- ``actor_train -> ref``, once at setup: the reference policy *is* the initial actor, so
  it is resharded from the freshly loaded training copy instead of being read (or, for a
  GGUF, dequantized whole) again on every reference device; on the same placement the
  plan is all local copies;
- ``actor_train -> actor_gen``, ``actor_train -> actor_infer`` and
  ``critic_train -> critic_infer``, at setup and after
  every training step, when the two placements differ (on the same placement the call
  uses the training module itself, :data:`fusedrl.runtime.worker.ALIASES`).

The reward model is a different network with a single placement: nothing to reshard, it
reads its own shard of its checkpoint.

Every worker builds the plans and executors of all pairs once, at setup (plans are pure
functions of the placements, so all workers agree on every schedule). The executors'
process groups (:meth:`ReallocExecutor.group_rank_lists`) join the runtime's single
global list of groups (:mod:`fusedrl.runtime.groups`), created once on every worker in
the same order, and the executors take them from the registry (``groups=``).

Inference-only copies (``actor_gen``, ``critic_infer``; never a trainable source, whose
weights and optimizer state always stay) are kept between iterations or, with
``placement.keep_inference_copies: false``, dropped once generation and inference are
over and re-materialised by the next sync: their parameter storage is resized to zero
bytes (as FSDP frees unsharded parameters, so modules and any view of a parameter stay
valid) together with the generation engine's KV cache, and allocated again right before
the executor writes into it -- ReaLHF's trade of memory during training for allocation
time in the reallocation.

Lifecycle (on each worker; the controller calls the same pairs on every device of
``src | dst``, in the same order)::

    sync = WeightSync(pairs, placements, model_config, ROLE_HEAD, device, dtypes, registry.get)
    registry.create_all(rank_lists(..., extra=sync.group_rank_lists()))   # every worker
    sync.run(src, dst, src_model, dst_model)      # -> ReallocStats (None: not involved)
    free_storage(dst_model) / restore_storage(dst_model)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fusedrl.layout import Placement
from fusedrl.realloc import ReallocExecutor, ReallocStats, plan_realloc
from fusedrl.realloc.executor import DEFAULT_BUCKET_BYTES
from fusedrl.roles import copy_pairs

INIT_PAIRS = tuple((str(s), str(d)) for s, d in copy_pairs("init"))
"""Copies made once, at setup, from the initial weights of a trainable model."""
STEP_PAIRS = tuple((str(s), str(d)) for s, d in copy_pairs("step"))
"""Inference copies of a trainable model, refreshed after every training step."""


def sync_pairs(placements: dict[str, str], roles: Iterable[str]
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(init_pairs, step_pairs)`` of a run: the step pairs whose placements differ (the
    same placement shares the training module) and the init pairs whose roles exist."""
    roles = set(roles)
    init = [(s, d) for s, d in INIT_PAIRS if s in roles and d in roles]
    step = [(s, d) for s, d in STEP_PAIRS
            if s in roles and d in roles and placements[s] != placements[d]]
    return init, step


class WeightSync:
    """The plans and executors of every pair, on the worker of ``device``.

    ``model_configs`` maps a role (or copy key) to its model config, or is one config
    for all; ``heads`` maps it to its model head (``lm`` or ``value``); ``groups`` maps
    a sorted device tuple to a process group (the runtime's registry).
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], placements: dict[str, Placement],
                 model_configs, heads: dict[str, str], device: int, dtype,
                 groups: Callable[[tuple[int, ...]], object],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, lossless: Iterable[str] = ()):
        lossless = set(lossless)
        self.device = device
        self.executors: dict[tuple[str, str], ReallocExecutor] = {}
        for src, dst in pairs:
            if heads[src] != heads[dst]:
                raise ValueError(f"{src} -> {dst}: heads differ ({heads[src]}, {heads[dst]})")
            mc = model_configs[dst] if isinstance(model_configs, dict) else model_configs
            # ``dtype``: one for all, or per role/copy key (model.frozen_dtype for the
            # reference). A copy between dtypes, or from/to a ``lossless`` key (a frozen
            # bf16 model keeps its norm weights in float32), travels in float32 and
            # converts as it unpacks: the reference and its one-device copies ``ref@d``
            # hold the same weights as a single-device reference.
            wire = dtype[src] if isinstance(dtype, dict) else dtype
            if isinstance(dtype, dict) and (dtype[src] != dtype[dst]
                                            or lossless & {src, dst}):
                wire = torch.float32
            plan = plan_realloc(mc, placements[src], placements[dst], heads[dst],
                                dtype_bytes=wire.itemsize)
            self.executors[src, dst] = ReallocExecutor(plan, device, dtype=wire,
                                                       bucket_bytes=bucket_bytes, groups=groups)

    def group_rank_lists(self) -> list[tuple[int, ...]]:
        """Groups of every pair's schedule, in pair order (the same on every worker)."""
        out: list[tuple[int, ...]] = []
        for ex in self.executors.values():
            out.extend(r for r in ex.group_rank_lists() if r not in out)
        return out

    @torch.no_grad()
    def run(self, src: str, dst: str, src_model: torch.nn.Module | None,
            dst_model: torch.nn.Module | None) -> ReallocStats | None:
        """Reshard ``src_model`` (this device's shard under ``src``; ``None`` if it holds
        none) into ``dst_model``, in place. Every device of ``src | dst`` calls it; the
        others get ``None`` back without communicating."""
        ex = self.executors[src, dst]
        if self.device not in ex.devices:
            return None
        dst_shards = dst_model.hf_state_dict() if dst_model is not None else None
        stats = ex.run(src_model.hf_state_dict() if src_model is not None else None, dst_shards)
        if dst_shards:
            # Collectives write without bumping autograd version counters; readers that
            # cache weights derived from the parameters (the generation fast path) key
            # their caches on those counters.
            torch.autograd.graph.increment_version(list(dst_shards.values()))
        return stats


def free_storage(model: torch.nn.Module) -> int:
    """Release the storage of every parameter of ``model`` (the tensors and modules stay,
    with zero-byte storage, until :func:`restore_storage`); returns the bytes freed."""
    freed = 0
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        if storage.nbytes() == 0:
            continue
        if p.storage_offset() != 0 or storage.nbytes() != p.numel() * p.element_size():
            raise ValueError(f"{name} shares its storage with other tensors: it cannot be "
                             f"freed on its own")
        freed += storage.nbytes()
        storage.resize_(0)
    return freed


def restore_storage(model: torch.nn.Module) -> int:
    """Allocate (uninitialised) storage again for every parameter freed by
    :func:`free_storage`; returns the bytes allocated."""
    allocated = 0
    for p in model.parameters():
        need = p.numel() * p.element_size()
        storage = p.untyped_storage()
        if need and storage.nbytes() == 0:
            storage.resize_(need)
            allocated += need
    return allocated
