"""Device memory accounting: how many bytes a device has for KV cache and activations.

Two consumers replace guesses with these numbers:

* **Inter-stage fusion** (RLHFuse §4): the migration rule sends the long tail to
  ``m = max(Rt/BSmax, Rt*M/C)`` instances, where ``C`` is one generation instance's KV
  cache capacity in bytes and ``M`` the KV bytes of one sample.
  :func:`kv_capacity_bytes` gives ``C`` from the memory left free after the weights
  (times a utilisation fraction, the headroom vLLM's ``gpu_memory_utilization``
  leaves), capped at the slot cache a native engine actually preallocates.
* **Intra-stage fusion** (RLHFuse §5): a fused actor/critic schedule may hold more
  forwarded-but-not-backwarded micro-batches on a node than 1F1B does; each costs the
  activation bytes :func:`activation_bytes_per_microbatch` measures, so the free
  memory bounds them (:func:`max_inflight_microbatches`;
  :func:`fusedrl.pipeline.fused_plan.memory_cap` turns it into the schedule's cap).

``torch`` is imported inside the functions: the pure arithmetic here serves the
torch-free planning code too.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) bytes of this process's cgroup v2 memory controller, if it has a
    limit: a container's RAM is bounded by it, not by the host's."""
    try:
        raw = (_CGROUP / "memory.max").read_text().strip()
        if raw == "max":
            return None
        return int(raw), int((_CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _host_memory() -> tuple[int, int]:
    """(available, total) bytes of host RAM. ``MemAvailable`` counts reclaimable page
    cache, which ``SC_AVPHYS_PAGES`` (free pages only) misses."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    free = os.sysconf("SC_AVPHYS_PAGES") * page
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    cg = _cgroup_limit()
    if cg is not None:
        limit, used = cg
        total, free = min(total, limit), min(free, max(0, limit - used))
    return free, total


def device_memory(device="cpu", share: int = 1) -> tuple[int, int]:
    """``(free, total)`` bytes of ``device``, divided by ``share`` processes using it.

    CUDA: ``torch.cuda.mem_get_info`` (free counts memory the caching allocator has not
    reserved; call ``torch.cuda.empty_cache()`` first for what it could reserve). CPU:
    the host's available RAM (bounded by the cgroup limit in a container); with
    ``share`` emulated devices on one host (the CPU Ray runtime, one core each) each
    device's share is ``1/share`` of it.
    """
    import torch

    if share < 1:
        raise ValueError(f"share must be >= 1, got {share}")
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free, total = _host_memory()
    else:
        raise ValueError(f"device_memory: unsupported device {device}")
    return int(free) // share, int(total) // share


def kv_bytes_per_token(config, dtype_bytes: int, tp: int = 1) -> int:
    """KV cache bytes of one token on one tensor-parallel rank: a key and a value per
    layer and local kv head, ``2 * layers * kv_heads/tp * head_dim * dtype_bytes``. With
    ``tp`` above ``num_kv_heads`` every rank keeps one (replicated) head (docs/design.md
    sharding convention)."""
    if dtype_bytes < 1 or tp < 1:
        raise ValueError(f"dtype_bytes and tp must be >= 1, got {dtype_bytes} and {tp}")
    local_heads = max(1, config.num_kv_heads // tp)
    return 2 * config.num_layers * local_heads * config.head_dim * dtype_bytes


def kv_capacity_bytes(config, free_bytes: int, *, dtype_bytes: int, weight_bytes: int = 0,
                      utilization: float = 0.9, tp: int = 1, max_slots: int | None = None,
                      max_len: int | None = None) -> int:
    """``C`` of RLHFuse's migration rule: KV cache bytes one generation instance holds.

    ``(free_bytes - weight_bytes) * utilization``, rounded down to whole tokens of
    :func:`kv_bytes_per_token`. ``free_bytes`` is the device's free memory
    (:func:`device_memory`); ``weight_bytes`` the weights still to be loaded there (0
    when measured after loading). The remaining ``1 - utilization`` is headroom for
    activations, sampling buffers and fragmentation. An engine that preallocates
    ``max_slots`` sequences of ``max_len`` tokens (the native slot cache) holds no more
    than that: give both to cap ``C`` at its geometry. 0 when nothing fits.
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    per_token = kv_bytes_per_token(config, dtype_bytes, tp)
    usable = max(0, int((free_bytes - weight_bytes) * utilization))
    tokens = usable // per_token
    if (max_slots is None) != (max_len is None):
        raise ValueError("kv_capacity_bytes: give both max_slots and max_len, or neither")
    if max_slots is not None:
        tokens = min(tokens, max_slots * max_len)
    return tokens * per_token


def kv_capacity_tokens(config, capacity_bytes: int, *, dtype_bytes: int, tp: int = 1) -> int:
    """How many tokens' keys and values ``capacity_bytes`` holds."""
    return int(capacity_bytes) // kv_bytes_per_token(config, dtype_bytes, tp)


def module_bytes(model) -> int:
    """Bytes of a module's parameters and buffers (the weights resident on its device)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def pending_training_bytes(model, optimizer) -> int:
    """Bytes that training ``model`` with the Adam-family ``optimizer`` will allocate that
    do not exist yet: gradients not allocated, and Adam's moments (``exp_avg``,
    ``exp_avg_sq``, plus ``max_exp_avg_sq`` with ``amsgrad``) of parameters without
    optimizer state (torch creates them at the first step).

    Free memory measured before the first step counts these as free; RLHFuse §5's
    schedule cap must not hand them to activations.
    """
    pending = 0
    for group in optimizer.param_groups:
        moments = 3 if group.get("amsgrad", False) else 2
        for p in group["params"]:
            nbytes = p.numel() * p.element_size()
            if p.requires_grad and p.grad is None:
                pending += nbytes
            if not optimizer.state.get(p):
                pending += moments * nbytes
    return pending


class SavedActivations:
    """Counts the bytes autograd saves for backward while active (a context manager):
    RLHFuse §5's per-micro-batch activation memory, held from a micro-batch's forward
    until its backward. The one counter of fusedrl (:func:`activation_bytes_per_microbatch`,
    :func:`fusedrl.pipeline.fused.profile_stage`).

    Counts the unique storages of the saved tensors, ``model``'s own parameters and
    buffers excluded (they are resident anyway). It is device-independent (no allocator
    statistics), so the same measurement runs on CPU; on CUDA the allocator's rounding
    adds at most a few hundred bytes per tensor. Keep the graph (the forward's output)
    alive until :attr:`nbytes` is read: a freed storage could be re-used under the same
    address and be counted once for two tensors.
    """

    def __init__(self, model):
        import torch

        self._resident = {t.untyped_storage().data_ptr()
                          for t in list(model.parameters()) + list(model.buffers())}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self._resident:
            self._seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())


def activation_bytes_per_microbatch(model, inputs) -> int:
    """Bytes autograd saves for backward during one forward of ``model`` on ``inputs``
    (token ids for a first stage, hidden states for a later one), counted by
    :class:`SavedActivations`. The graph is dropped before returning. Parameters with
    ``requires_grad=False`` save nothing for their own gradients, as in training.
    """
    import torch

    with torch.enable_grad(), SavedActivations(model) as saved:
        out = model(inputs)
    nbytes = saved.nbytes  # read while `out` keeps every saved storage alive
    del out
    return nbytes


def max_inflight_microbatches(free_bytes: float, act_bytes: float) -> int:
    """Forwarded-but-not-backwarded micro-batches of ``act_bytes`` each that fit in
    ``free_bytes`` (0 if not even one does): the schedule memory cap in micro-batches."""
    if act_bytes <= 0:
        raise ValueError(f"act_bytes must be > 0, got {act_bytes}")
    return max(0, int(free_bytes // act_bytes))


__all__ = ["device_memory", "kv_bytes_per_token", "kv_capacity_bytes", "kv_capacity_tokens",
           "module_bytes", "pending_training_bytes", "SavedActivations",
           "activation_bytes_per_microbatch", "max_inflight_microbatches"]


def pending_generation_bytes(model, config, backend=None) -> int:
    """Bytes the native generation engine on ``model`` will add to this device and does
    not hold yet: the fast path's own weight copies (fused q/k/v and gate/up, and the
    MKL-packed weights up to ``generation.packed_weights_gib``;
    :meth:`fusedrl.generation.fastpath.FastForward.planned_bytes`). They are built at
    the first decode step, after free memory is usually measured, so the accounting
    (:meth:`fusedrl.runtime.worker.Worker.device_memory`: RLHFuse §4's ``C``, §5's
    schedule cap) subtracts them up front. ``backend``: the engine if already built
    (its held bytes are resident, hence already not free); 0 for other backends."""
    g = config.generation
    if g.backend != "native":
        return 0
    if backend is not None:
        held, planned = backend.weight_cache_bytes()
        return max(0, planned - held)
    from fusedrl.generation import fastpath

    if not fastpath.supports(model):
        return 0
    return fastpath.FastForward(model, pack_rows=g.max_batch_size,
                                pack_bytes=int(g.packed_weights_gib * (1 << 30))).planned_bytes()
