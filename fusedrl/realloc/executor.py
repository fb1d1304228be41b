"""Reallocation executor: run a :class:`~fusedrl.realloc.plan.ReallocPlan` across workers.

The execution half of ReaLHF's parameter reallocation (Mei et al., arXiv 2406.14088,
"parameter reallocation"): every worker holds its shards under the source placement
and receives its shards under the destination placement; no full parameter is ever
assembled on one device, and each byte that crosses devices is one the destination
did not hold (the plan's contract).

Execution model. The plan is turned into a *schedule* (:func:`build_schedule`), a
list of :class:`Message` that is identical on every process because it is a pure
function of the plan and the bucket size:

- a plan piece that one sender delivers to several devices (a
  :class:`~fusedrl.realloc.plan.BroadcastGroup` with several ``dsts``) travels as a
  ``dist.broadcast`` on the group ``{src} | dsts`` -- ReaLHF's broadcast groups; a
  piece with one receiver travels as point-to-point (``isend``/``irecv`` through
  ``dist.batch_isend_irecv``) on the pair's group;
- pieces with the same sender and receivers are cut into *chunks* (sub-regions of at
  most ``bucket_bytes``); a chunk of at least ``direct_min_bytes`` that is contiguous
  in the sender's and every receiver's shard (e.g. a column-parallel half) is its own
  message, sent and received in place; the others (row-parallel halves, norms, small
  pieces) are packed, in plan order, into flat staging buffers of at most
  ``bucket_bytes`` and unpacked on arrival;
- the messages of all (sender, receivers) streams are interleaved round-robin into
  one global order, so that every sender is busy from the start.

Every process issues its own messages asynchronously in that global order and, to
bound memory, keeps at most ``inflight`` messages (and staging buffers of
``bucket_bytes``) outstanding, waiting for the oldest before issuing more. This is
deadlock-free: the earliest unfinished message in the global order has, on each of
its members, only earlier (hence finished) messages before it, so every member
issues it and it completes. Local copies (pieces a device already held) run while
the first messages are in flight.

Process groups. World rank == device id. Broadcast and pair groups are created once
per rank set and cached for the life of the world (so placement pairs sharing rank
sets share groups). Creation uses ``dist.new_group(ranks)`` with torch's standard
contract: *every* process of the world calls :meth:`ReallocExecutor.build_groups`
(also those outside the plan) with the same plans in the same order; only members
connect. ``use_local_synchronization=True`` is deliberately not used: torch 2.13
names such a group by hashing its ranks with the *creating process's* count of
groups so far, so two members that created different numbers of groups before
(any two overlapping groups, e.g. ``{0,2,3}`` and ``{1,2,3}``) derive different
names and wait for each other forever. A runtime that owns its groups can pass
``groups=`` (rank tuple -> group) and create :meth:`ReallocExecutor.group_rank_lists`
itself.

Transports. ``transport="collective"`` (default) is the above: gloo on CPU, NCCL on
GPU. ``transport="shm"`` is for CPU workers on one host: pieces go through
shared-memory staging slots (:mod:`fusedrl.realloc.shm`; one pack by the sender, one
copy by each receiver) and only tiny ready/done tokens cross gloo: a broadcast is
packed once instead of written into a socket per receiver. ``bench/realloc_bench.py``
compares the two side by side.

Lifecycle::

    plan = plan_realloc(config, src, dst, dtype_bytes=2)
    ex = ReallocExecutor(plan, device_id=dist.get_rank(), dtype=torch.bfloat16)
    ex.build_groups()                        # every process of the world, same order
    dst_shards = ex.allocate_dst_shards()    # None if this device is not in dst
    ex.run(src_shards, dst_shards)           # every device of src | dst
    ex.stats                                 # seconds spent packing, waiting, ...
    ex.release_buffers()                     # optional: free the staging buffers

On CUDA tensors the backend carrying them must be NCCL (``nccl`` or torch's per-device
``cpu:gloo,cuda:nccl``) and the current device set; on CPU, gloo. Staging buffers are
allocated on the shards' device.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from fusedrl.devices import backend_for
from fusedrl.realloc.plan import ReallocPlan
from fusedrl.models.sharding import (
    Region,
    local_slices,
    region_numel,
    region_shape,
    shard_regions,
)

DEFAULT_BUCKET_BYTES = 8 << 20
DEFAULT_INFLIGHT = 8
DEFAULT_DIRECT_MIN_BYTES = 256 << 10


# ------------------------------------------------------------------------ schedule


class Chunk(NamedTuple):
    """A sub-region of one plan piece, in full-parameter coordinates."""

    param: str
    region: Region

    @property
    def numel(self) -> int:
        return region_numel(self.region)


@dataclass(frozen=True)
class Message:
    """One communication operation: ``src`` sends ``chunks`` (concatenated row-major,
    flat) to every device of ``dsts``; a broadcast when ``len(dsts) > 1``."""

    index: int
    src: int
    dsts: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    direct: bool = False
    """One chunk, contiguous in the sender's and every receiver's shard: sent and
    received in place, without a staging copy."""

    @property
    def ranks(self) -> tuple[int, ...]:
        """Members of the process group that carries the message (sorted)."""
        return tuple(sorted({self.src, *self.dsts}))

    @property
    def is_broadcast(self) -> bool:
        return len(self.dsts) > 1

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.chunks)


def split_region(region: Region, max_numel: int) -> list[Region]:
    """Cut ``region`` into row-major-ordered sub-regions of at most ``max_numel`` elements.

    Whole rows (dim-0 slabs) are kept together when a row fits; a row larger than
    ``max_numel`` is cut along the next dimension, recursively.
    """
    if max_numel < 1:
        raise ValueError(f"max_numel must be positive, got {max_numel}")
    if region_numel(region) <= max_numel:
        return [region]
    (a, b), rest = region[0], region[1:]
    inner = region_numel(rest) if rest else 1
    if inner <= max_numel:
        rows = max_numel // inner
        return [((s, min(s + rows, b)),) + rest for s in range(a, b, rows)]
    return [((i, i + 1),) + tail for i in range(a, b) for tail in split_region(rest, max_numel)]


def is_contiguous_in(region: Region, shard_region: Region) -> bool:
    """Whether ``region`` is one contiguous run of a row-major shard of ``shard_region``."""
    ext, full = region_shape(region), region_shape(shard_region)
    first = next((i for i, e in enumerate(ext) if e > 1), len(ext))
    return all(ext[j] == full[j] for j in range(first + 1, len(ext)))


def _device_regions(plan: ReallocPlan, placement) -> dict[int, dict[str, Region]]:
    return {dev: shard_regions(plan.config, placement.layout, rank, plan.head)
            for rank, dev in enumerate(placement.devices)}


def build_schedule(plan: ReallocPlan, bucket_numel: int,
                   direct_min_numel: int | None = None) -> list[Message]:
    """The global, deterministic list of messages that executes ``plan``'s remote part.

    Pure function of the plan: every process computes the same list. A chunk of at
    least ``direct_min_numel`` elements (default: a bucket, i.e. never) that is
    contiguous in the sender's and every receiver's shard travels alone and in place
    (``Message.direct``); the others are packed, in plan order, into messages of at
    most ``bucket_numel``. Messages of one ``(src, dsts)`` stream keep plan order;
    streams are interleaved round-robin (sorted by ``(src, dsts)``) so that all
    senders start at once.
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket must hold at least one element, got {bucket_numel}")
    direct_min = bucket_numel if direct_min_numel is None else max(1, direct_min_numel)
    held, wanted = _device_regions(plan, plan.src), _device_regions(plan, plan.dst)
    streams: dict[tuple[int, tuple[int, ...]], list[tuple[list[Chunk], bool]]] = {}
    for group in plan.broadcast_groups():  # plan order within each stream
        msgs = streams.setdefault((group.src, group.dsts), [])
        for sub in split_region(group.region, bucket_numel):
            chunk = Chunk(group.param, sub)
            if (chunk.numel >= direct_min
                    and is_contiguous_in(sub, held[group.src][group.param])
                    and all(is_contiguous_in(sub, wanted[d][group.param]) for d in group.dsts)):
                msgs.append(([chunk], True))
            elif (msgs and not msgs[-1][1]
                    and sum(c.numel for c in msgs[-1][0]) + chunk.numel <= bucket_numel):
                msgs[-1][0].append(chunk)
            else:
                msgs.append(([chunk], False))
    keys = sorted(streams)
    schedule: list[Message] = []
    for i in range(max((len(v) for v in streams.values()), default=0)):
        for key in keys:
            if i < len(streams[key]):
                (src, dsts), (chunks, direct) = key, streams[key][i]
                schedule.append(Message(len(schedule), src, dsts, tuple(chunks), direct))
    return schedule


# ------------------------------------------------------------------------ groups

_GROUPS: dict[tuple[int, ...], Any] = {}
_GROUPS_WORLD: list[Any] = [None]  # the WORLD group the cache belongs to


def _group_cache() -> dict[tuple[int, ...], Any]:
    world = dist.group.WORLD
    if _GROUPS_WORLD[0] is not world:  # a new world (re-initialised): drop stale groups
        _GROUPS.clear()
        _GROUPS_WORLD[0] = world
    return _GROUPS


# ------------------------------------------------------------------------ executor


SHARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes a shard may have; another than the wire's is converted while copying."""


@dataclass
class ReallocStats:
    """Host seconds of the last :meth:`ReallocExecutor.run`, by activity."""

    seconds: float = 0.0
    pack_s: float = 0.0
    unpack_s: float = 0.0
    local_s: float = 0.0
    wait_s: float = 0.0
    issue_s: float = 0.0
    messages: int = 0
    staged_messages: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


class ReallocExecutor:
    """Executes one plan on the process whose world rank is ``device_id``.

    ``bucket_bytes`` bounds every message and staging buffer; ``inflight`` bounds how
    many messages (hence staging buffers) are outstanding at once, so the extra
    memory is at most ``inflight * bucket_bytes``. Pieces of at least
    ``direct_min_bytes`` that are contiguous on both ends skip the staging copies.
    ``groups`` optionally maps a sorted rank tuple to an existing process group (a
    runtime's registry); by default the executor creates and caches them
    (:meth:`build_groups`). ``transport``: ``"collective"`` or ``"shm"`` (module doc).

    ``dtype`` is the dtype on the wire (the plan counts its bytes). A shard may be in
    another floating dtype (:data:`SHARD_DTYPES`): it is converted when packed or
    unpacked, and never sent or received in place. So a frozen bfloat16 reference
    (``model.frozen_dtype``) is filled from the float32 actor with no float32 copy of it
    allocated, beyond the bounded staging buffers, and its norm weights (float32 in a
    bfloat16 model) keep their precision.
    """

    def __init__(
        self,
        plan: ReallocPlan,
        device_id: int,
        *,
        dtype: torch.dtype = torch.float32,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        inflight: int = DEFAULT_INFLIGHT,
        direct_min_bytes: int = DEFAULT_DIRECT_MIN_BYTES,
        groups: Callable[[tuple[int, ...]], Any] | None = None,
        transport: str = "collective",
    ):
        itemsize = torch.empty((), dtype=dtype).element_size()
        if plan.dtype_bytes != itemsize:
            raise ValueError(f"plan counts {plan.dtype_bytes}-byte elements but dtype {dtype} "
                             f"has {itemsize}: plan with dtype_bytes={itemsize}")
        if bucket_bytes < itemsize:
            raise ValueError(f"bucket_bytes={bucket_bytes} is smaller than one element")
        if inflight < 1:
            raise ValueError(f"inflight={inflight} must be at least 1")
        if transport not in ("collective", "shm"):
            raise ValueError(f"transport must be 'collective' or 'shm', got {transport!r}")
        self.transport = transport
        self._shm = None
        self.plan = plan
        self.device_id = int(device_id)
        self.dtype = dtype
        self.bucket_numel = bucket_bytes // itemsize
        self._itemsize = itemsize
        self.inflight = inflight
        self._external_groups = groups
        self.src_rank = plan.src.rank_of(self.device_id)
        self.dst_rank = plan.dst.rank_of(self.device_id)
        self.src_regions = (shard_regions(plan.config, plan.src.layout, self.src_rank, plan.head)
                            if self.src_rank is not None else None)
        self.dst_regions = (shard_regions(plan.config, plan.dst.layout, self.dst_rank, plan.head)
                            if self.dst_rank is not None else None)
        self.schedule = build_schedule(plan, self.bucket_numel,
                                       max(1, direct_min_bytes // itemsize))
        self.my_messages = [m for m in self.schedule
                            if m.src == self.device_id or self.device_id in m.dsts]
        self.local_transfers = [t for t in plan.local_transfers if t.dst == self.device_id]
        # ordinal of each message among its sender's messages (its shm slot)
        counts: dict[int, int] = {}
        self._ordinal: dict[int, int] = {}
        for m in self.schedule:
            self._ordinal[m.index] = counts.get(m.src, 0)
            counts[m.src] = self._ordinal[m.index] + 1
        self._buffers: list[torch.Tensor] = []
        self.stats = ReallocStats()

    # ---- groups ----------------------------------------------------------------
    @property
    def devices(self) -> tuple[int, ...]:
        """Every device of the source or destination placement (sorted)."""
        return tuple(sorted(set(self.plan.src.devices) | set(self.plan.dst.devices)))

    def group_rank_lists(self) -> list[tuple[int, ...]]:
        """Rank sets of every group the schedule uses, sorted (same on every process):
        broadcast and pair groups, or only (sender, receiver) pairs with ``transport="shm"``."""
        if self.transport == "shm":
            return sorted({tuple(sorted((m.src, d))) for m in self.schedule for d in m.dsts})
        return sorted({m.ranks for m in self.schedule})

    def build_groups(self) -> None:
        """Create the process groups of the whole schedule (cached per rank set).

        Collective over the *world* (torch's ``new_group`` contract): every process
        calls it for the same plans in the same order, members and non-members alike.
        With ``groups=`` no group is created; with ``transport="shm"`` the shared
        staging slots are set up here too (also collective over the world).
        """
        if self.transport == "shm" and self._shm is None:
            from fusedrl.realloc.shm import ShmSlots

            slot_numel: dict[int, int] = {}
            for m in self.schedule:
                slot_numel[m.src] = max(slot_numel.get(m.src, 0), m.numel)
            peers = {m.src for m in self.my_messages if m.src != self.device_id}
            self._shm = ShmSlots.create(self.device_id, slot_numel, peers, self.inflight,
                                        self.dtype)
        if self._external_groups is not None:
            return
        world = dist.get_world_size()
        bad = [d for d in self.devices if d >= world]
        if bad:
            raise ValueError(f"device {bad[0]} of the plan is outside the world of {world} "
                             f"processes (rank == device id)")
        cache = _group_cache()
        for ranks in self.group_rank_lists():
            if ranks not in cache:
                cache[ranks] = dist.new_group(list(ranks))

    def _group(self, ranks: tuple[int, ...]) -> Any:
        if self._external_groups is not None:
            return self._external_groups(ranks)
        try:
            return _group_cache()[ranks]
        except KeyError:
            raise RuntimeError(f"process group {ranks} does not exist: call build_groups() on "
                               f"every process first") from None

    # ---- shards ----------------------------------------------------------------
    def allocate_dst_shards(
        self, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor] | None:
        """Uninitialised destination shards of this device, ``None`` if not in ``dst``."""
        if self.dst_regions is None:
            return None
        return {name: torch.empty(region_shape(r), dtype=self.dtype, device=device)
                for name, r in self.dst_regions.items()}

    def _check_shards(self, role: str, shards: Mapping[str, torch.Tensor] | None,
                      regions: dict[str, Region] | None) -> None:
        placement = self.plan.src if role == "source" else self.plan.dst
        if regions is None:
            if shards is not None:
                raise ValueError(f"device {self.device_id} is not in the {role} placement "
                                 f"{placement}, but {role} shards were given")
            return
        if shards is None:
            raise ValueError(f"device {self.device_id} is in the {role} placement {placement}: "
                             f"{role} shards are required")
        missing = sorted(set(regions) - set(shards))
        extra = sorted(set(shards) - set(regions))
        if missing or extra:
            raise ValueError(f"{role} shards of device {self.device_id}: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, region in regions.items():
            t = shards[name]
            if tuple(t.shape) != region_shape(region):
                raise ValueError(f"{role} shard {name}: shape {tuple(t.shape)}, expected "
                                 f"{region_shape(region)}")
            if t.dtype not in SHARD_DTYPES:
                raise ValueError(f"{role} shard {name}: dtype {t.dtype}, expected one of "
                                 f"{SHARD_DTYPES} (converted to/from {self.dtype})")

    def _views(self, shards, regions, chunk: Chunk) -> torch.Tensor:
        return shards[chunk.param][local_slices(chunk.region, regions[chunk.param])]

    def _pack(self, msg, src_shards, flat: torch.Tensor) -> None:
        """Copy the message's chunks from this device's source shards into ``flat``."""
        off = 0
        for chunk in msg.chunks:
            view = self._views(src_shards, self.src_regions, chunk)
            flat[off:off + chunk.numel].view(view.shape).copy_(view)
            off += chunk.numel

    def _unpack(self, msg, flat: torch.Tensor, dst_shards) -> None:
        """Copy ``flat`` into the message's chunks of this device's destination shards."""
        off = 0
        for chunk in msg.chunks:
            view = self._views(dst_shards, self.dst_regions, chunk)
            view.copy_(flat[off:off + chunk.numel].view(view.shape))
            off += chunk.numel

    # ---- execution -------------------------------------------------------------
    def run(self, src_shards: Mapping[str, torch.Tensor] | None,
            dst_shards: Mapping[str, torch.Tensor] | None) -> ReallocStats:
        """Fill ``dst_shards`` (this device's shards under ``dst``, preallocated) from
        every device's ``src_shards``; returns (and keeps in ``stats``) the timings.

        Every device of ``src | dst`` calls it for the same plan; a device outside
        both may skip it. ``dst_shards`` must not alias ``src_shards`` except where a
        destination shard *is* the source shard of the same region (skipped copy).
        """
        self._check_shards("source", src_shards, self.src_regions)
        self._check_shards("destination", dst_shards, self.dst_regions)
        tensors = [*(src_shards or {}).values(), *(dst_shards or {}).values()]
        device = tensors[0].device if tensors else torch.device("cpu")
        if any(t.device != device for t in tensors):
            raise ValueError("all source and destination shards must be on one device")
        if device.type == "cuda" and self.my_messages:
            # The group may be NCCL alone or torch's per-device "cpu:gloo,cuda:nccl" (the
            # Ray runtime on GPUs): what matters is the backend that carries CUDA tensors.
            backend = dist.get_backend(self._group(self.my_messages[0].ranks))
            if backend_for(backend, "cuda") != "nccl":
                raise ValueError(f"CUDA shards need the NCCL backend, got {backend}")
        stats = self.stats = ReallocStats()
        t_start = time.perf_counter()
        if self.transport == "shm":
            if device.type != "cpu":
                raise ValueError("transport='shm' is for CPU shards")
            if self._shm is None and self.my_messages:
                raise RuntimeError("shared-memory slots do not exist: call build_groups() on "
                                   "every process first")
            self._run_shm(src_shards, dst_shards, stats)
            stats.seconds = time.perf_counter() - t_start
            return stats
        self._ensure_buffers(device, max(
            (m.numel for m in self.my_messages
             if self._in_place(m, src_shards, dst_shards) is None), default=0))
        free = list(self._buffers)
        pending: deque = deque()  # (message, works, staging buffer or None)
        local_done = False

        def retire_oldest() -> None:
            msg, works, buf = pending.popleft()
            t0 = time.perf_counter()
            for w in works:
                w.wait()
            stats.wait_s += time.perf_counter() - t0
            if msg.src != self.device_id and buf is not None:
                t0 = time.perf_counter()
                self._unpack(msg, buf, dst_shards)
                stats.unpack_s += time.perf_counter() - t0
            if buf is not None:
                free.append(buf)

        for msg in self.my_messages:
            sending = msg.src == self.device_id
            direct = self._in_place(msg, src_shards, dst_shards)
            while len(pending) >= self.inflight or (direct is None and not free):
                if not local_done:  # overlap the local copies with the first messages
                    self._local_copies(src_shards, dst_shards)
                    local_done = True
                    continue
                retire_oldest()
            buf = None
            if direct is not None:
                tensor = direct
            else:
                buf = free.pop()
                tensor = buf[:msg.numel]
                stats.staged_messages += 1
                if sending:
                    t0 = time.perf_counter()
                    self._pack(msg, src_shards, tensor)
                    stats.pack_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            pending.append((msg, self._issue(msg, tensor, sending), buf))
            stats.issue_s += time.perf_counter() - t0
            stats.messages += 1
            nbytes = msg.numel * tensor.element_size()
            if sending:
                stats.bytes_sent += nbytes * len(msg.dsts)
            else:
                stats.bytes_received += nbytes
        if not local_done:
            self._local_copies(src_shards, dst_shards)
        while pending:
            retire_oldest()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        stats.seconds = time.perf_counter() - t_start
        return stats

    def _run_shm(self, src_shards, dst_shards, stats: ReallocStats) -> None:
        """Shared-memory execution (:mod:`fusedrl.realloc.shm`): the sender packs a
        message once into its slot and sends a *ready* token to each receiver; a
        receiver copies the slot into its shard and answers *done*, which frees the
        slot for the sender's message ``j + inflight``.

        Deadlock-free like the collective path: receipts retire in global order, and
        a sender drains its own pending receipts before it waits for *done* tokens,
        so the earliest unfinished message always finishes.
        """
        me = self.device_id
        ready = torch.zeros(1, dtype=torch.int32)  # tokens: only their arrival matters
        receipts: deque = deque()  # (message, ready work, token buffer)
        slot_waits: dict[int, tuple[list, list]] = {}  # slot -> (works, token buffers)
        acks_sent: list = []
        local_done = False

        def pair(peer: int) -> Any:
            return self._group((min(me, peer), max(me, peer)))

        def retire_oldest() -> None:
            msg, work, _ = receipts.popleft()
            t0 = time.perf_counter()
            work.wait()
            stats.wait_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            slot = self._shm.slot(msg.src, self._ordinal[msg.index])
            self._unpack(msg, slot, dst_shards)
            stats.unpack_s += time.perf_counter() - t0
            acks_sent.append(dist.isend(ready, msg.src, group=pair(msg.src)))

        for msg in self.my_messages:
            if not local_done and (receipts or slot_waits):
                self._local_copies(src_shards, dst_shards)  # overlap with the first messages
                local_done = True
            if msg.src == me:
                j = self._ordinal[msg.index]
                k = j % self.inflight
                if k in slot_waits:
                    while receipts:
                        retire_oldest()
                    t0 = time.perf_counter()
                    for w in slot_waits.pop(k)[0]:
                        w.wait()
                    stats.wait_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                slot = self._shm.slot(me, j)
                self._pack(msg, src_shards, slot)
                stats.pack_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                works = [dist.isend(ready, d, group=pair(d)) for d in msg.dsts]
                dones = [torch.zeros(1, dtype=torch.int32) for _ in msg.dsts]
                works += [dist.irecv(t, d, group=pair(d)) for t, d in zip(dones, msg.dsts)]
                slot_waits[k] = (works, dones)  # token buffers live as long as their works
                stats.issue_s += time.perf_counter() - t0
                stats.bytes_sent += msg.numel * self._itemsize * len(msg.dsts)
            else:
                while len(receipts) >= self.inflight:
                    retire_oldest()
                t0 = time.perf_counter()
                token = torch.zeros(1, dtype=torch.int32)
                receipts.append((msg, dist.irecv(token, msg.src, group=pair(msg.src)), token))
                stats.issue_s += time.perf_counter() - t0
                stats.bytes_received += msg.numel * self._itemsize
            stats.messages += 1
            stats.staged_messages += 1
        if not local_done:
            self._local_copies(src_shards, dst_shards)
        while receipts:
            retire_oldest()
        t0 = time.perf_counter()
        for works, _ in slot_waits.values():
            for w in works:
                w.wait()
        for w in acks_sent:
            w.wait()
        stats.wait_s += time.perf_counter() - t0

    def _issue(self, msg: Message, tensor: torch.Tensor, sending: bool) -> list:
        group = self._group(msg.ranks)
        if msg.is_broadcast:
            # ReaLHF: one broadcast per (sender, receivers) piece instead of a send per
            # receiver; NCCL pipelines it as a ring, gloo sends from the root.
            return [dist.broadcast(tensor, src=msg.src, group=group, async_op=True)]
        op = (dist.P2POp(dist.isend, tensor, msg.dsts[0], group) if sending
              else dist.P2POp(dist.irecv, tensor, msg.src, group))
        return dist.batch_isend_irecv([op])

    def _local_copies(self, src_shards, dst_shards) -> None:
        t0 = time.perf_counter()
        for t in self.local_transfers:
            src = src_shards[t.param][local_slices(t.region, self.src_regions[t.param])]
            dst = dst_shards[t.param][local_slices(t.region, self.dst_regions[t.param])]
            if (src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride()
                    and src.shape == dst.shape):
                continue  # the destination shard is the source shard: nothing to copy
            dst.copy_(src)
        self.stats.local_s += time.perf_counter() - t0

    def _in_place(self, msg, src_shards, dst_shards) -> torch.Tensor | None:
        """The flat shard view a direct message is sent from or received into, or None:
        staged (not direct, or this side's shard is not contiguous or not in the wire's
        dtype)."""
        if not msg.direct:
            return None
        view = (self._views(src_shards, self.src_regions, msg.chunks[0])
                if msg.src == self.device_id
                else self._views(dst_shards, self.dst_regions, msg.chunks[0]))
        if not view.is_contiguous() or view.dtype != self.dtype:
            return None
        return view.view(-1)

    def _ensure_buffers(self, device: torch.device, need: int) -> None:
        """Staging buffers: ``inflight`` flat buckets of ``need`` elements (the largest
        message of this device that is staged, at most a bucket), kept across runs
        (bounded memory)."""
        if not need:
            return
        if (len(self._buffers) == self.inflight and self._buffers[0].device == device
                and self._buffers[0].numel() >= need):
            return
        self._buffers = [torch.empty(need, dtype=self.dtype, device=device)
                         for _ in range(self.inflight)]

    def release_buffers(self) -> None:
        """Free the staging buffers (they are reallocated by the next :meth:`run`)."""
        self._buffers = []

    def __repr__(self) -> str:
        return (f"ReallocExecutor(device {self.device_id}, {self.plan.src} -> {self.plan.dst}, "
                f"{len(self.my_messages)} of {len(self.schedule)} messages, "
                f"bucket {self.bucket_numel} elements, inflight {self.inflight})")
