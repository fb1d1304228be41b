"""KV-cache migration of long-tail samples between generation instances (RLHFuse,
arXiv 2409.13221 §4).

When inter-stage fusion frees an instance, each of its unfinished samples continues on
a kept instance, either by **re-prefill** (the destination re-reads prompt + generated
tokens, ``Request.resume``) or by **KV transfer**: the source exports the sample's
per-layer keys and values (``GenerationEngine.export_kv``), they travel to the
destination over the worker group, and the destination decodes on from them
(``GenerationEngine.import_kv``). The per-sample random streams make the tokens and
log-probs those of an unmigrated run either way.

Which of the two: per sample, by the cost model the simulator uses
(:func:`fusedrl.scheduler.migration.choose_method`: ``GenCostModel.kv_transfer_s``
against ``reprefill_s``), its transfer terms measured here (:func:`fit_transfer`: a
probe at start, then every transfer of the run) like the decode and prefill terms;
``fusion.migration`` forces one method (``kv``/``reprefill``). Backends without KV
export (vLLM) re-prefill.

Transport. The reallocation engine's collective transport (:mod:`fusedrl.realloc.executor`):
the caches of all samples going from one source to one destination are packed, in
order, into one flat staging buffer cut into buckets of at most ``bucket_bytes``
(``DEFAULT_BUCKET_BYTES``), each bucket one point-to-point message over the workers'
torch.distributed world (gloo on CPU, NCCL on GPU) under its own tag (:data:`TAG`), so
it never matches another point-to-point message (pipeline stages use their own channel
groups). The source posts its sends when it aborts (non-blocking: it goes on to
inference at once); the destination posts the matching receives in its next
``gen_run``, which is when the controller would have handed it the re-prefilled
samples, so both methods reach the destination at the same point of its call stream.
The probe at start (:meth:`KVMigrationWorker.kv_probe`, every pair of generation
devices) also sets up NCCL's pair communicators, whose lazy creation would otherwise
block a source until its destination receives.

Lifecycle::

    parcels = worker_src.gen_migrate(role, {sample_id: dst_device})   # abort + send
    worker_dst.gen_run(role, requests, k, kv_in=[parcel])              # receive + decode
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from fusedrl.realloc.executor import DEFAULT_BUCKET_BYTES
from fusedrl.scheduler.gen_cost import _nonneg_lstsq
from fusedrl.scheduler.migration import KV_TRANSFER, REPREFILL, MigrationPlan

TAG = 0x4B56
"""Tag of KV-migration messages on the world group ("KV")."""

MODES = ("auto", KV_TRANSFER, REPREFILL)


# ---------------------------------------------------------------------- packing


@dataclass
class KVParcel:
    """The caches of several samples going from ``src`` to ``dst`` in one transfer:
    what the controller forwards from the source's export to the destination."""

    src: int
    dst: int
    samples: list  # partial Samples, in packing order
    tokens: list[int]  # cached tokens of each sample (prompt + generated - 1)
    layout: tuple[int, int, int]  # (layers, kv heads, head dim)
    dtype: str
    buckets: list[int]  # elements of each message
    export_s: float = 0.0

    @property
    def numel(self) -> int:
        return sum(self.buckets)

    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def bucket_sizes(numel: int, bucket_numel: int) -> list[int]:
    """``numel`` elements cut into messages of at most ``bucket_numel``."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    full, rest = divmod(numel, bucket_numel)
    return [bucket_numel] * full + ([rest] if rest else [])


def pack(kvs: list[torch.Tensor]) -> torch.Tensor:
    """The caches concatenated, flat, in order (one staging buffer)."""
    flat = torch.empty(sum(kv.numel() for kv in kvs), dtype=kvs[0].dtype, device=kvs[0].device)
    off = 0
    for kv in kvs:
        flat[off:off + kv.numel()].view(kv.shape).copy_(kv)
        off += kv.numel()
    return flat


def unpack(flat: torch.Tensor, tokens: list[int], layout: tuple[int, int, int]
           ) -> list[torch.Tensor]:
    """Views of ``flat`` as the caches of ``tokens``-long samples (``[layers, 2, heads,
    n, head_dim]`` each)."""
    layers, heads, head_dim = layout
    out, off = [], 0
    for n in tokens:
        size = layers * 2 * heads * n * head_dim
        out.append(flat[off:off + size].view(layers, 2, heads, n, head_dim))
        off += size
    if off != flat.numel():
        raise ValueError(f"KV parcel of {flat.numel()} elements, its samples need {off}")
    return out


def _views(flat: torch.Tensor, buckets: list[int]) -> list[torch.Tensor]:
    out, off = [], 0
    for n in buckets:
        out.append(flat[off:off + n])
        off += n
    return out


# ---------------------------------------------------------------------- transport


@dataclass
class KVSender:
    """The sends a source posted and whose buffers must live until they complete."""

    pending: list = field(default_factory=list)  # (works, flat buffer)

    def send(self, dst: int, flat: torch.Tensor, buckets: list[int]) -> None:
        """Post one message per bucket to ``dst`` (non-blocking)."""
        works = [dist.isend(view, dst, tag=TAG) for view in _views(flat, buckets)]
        self.pending.append((works, flat))
        self.reap()

    def reap(self) -> None:
        """Drop the sends that completed."""
        self.pending = [(w, f) for w, f in self.pending
                        if not all(x.is_completed() for x in w)]

    def wait_all(self) -> None:
        for works, _ in self.pending:
            for w in works:
                w.wait()
        self.pending = []


def receive(parcel: KVParcel, device) -> tuple[list[torch.Tensor], float]:
    """Receive ``parcel``'s buckets from its source; the caches and the seconds taken."""
    t0 = time.perf_counter()
    flat = torch.empty(parcel.numel, dtype=getattr(torch, parcel.dtype), device=device)
    works = [dist.irecv(view, parcel.src, tag=TAG) for view in _views(flat, parcel.buckets)]
    for w in works:
        w.wait()
    if flat.device.type == "cuda":
        torch.cuda.current_stream(flat.device).synchronize()
    return unpack(flat, parcel.tokens, parcel.layout), time.perf_counter() - t0


# ---------------------------------------------------------------------- cost model


def fit_transfer(points) -> tuple[float, float]:
    """``(latency_s, bandwidth)`` of ``seconds = latency + bytes / bandwidth``, fitted
    (non-negative least squares) to measured ``(bytes, seconds)`` transfers: the
    ``transfer_latency_s``/``transfer_bandwidth`` of :class:`GenCostModel`."""
    pts = np.asarray(list(points), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2 or len(set(pts[:, 0])) < 2:
        raise ValueError("fit_transfer: need (bytes, seconds) points of at least 2 sizes")
    latency, per_byte = _nonneg_lstsq(np.stack([np.ones(len(pts)), pts[:, 0]], axis=1),
                                      pts[:, 1])
    if per_byte <= 0:  # sizes too close to see the slope: the fastest observed rate
        per_byte = float(min(s / b for b, s in pts if b > 0))
    return float(latency), float(1.0 / per_byte)


def methods(plan: MigrationPlan, mode: str, can_kv: bool) -> dict[int, str]:
    """``sample_id -> method`` of the plan's moves under ``fusion.migration = mode``:
    the plan's own (cost model) choice for ``auto``, else the forced one; re-prefill
    everywhere when the backend cannot export KV caches."""
    if mode not in MODES:
        raise ValueError(f"fusion.migration={mode!r}: must be one of {', '.join(MODES)}")
    if not can_kv or mode == REPREFILL:
        return {mv.sample_id: REPREFILL for mv in plan.moves}
    if mode == KV_TRANSFER:
        return {mv.sample_id: KV_TRANSFER for mv in plan.moves}
    return {mv.sample_id: mv.method for mv in plan.moves}


# ---------------------------------------------------------------------- worker side


class KVMigrationWorker:
    """Mixin of the Ray worker (with :class:`~fusedrl.interstage.worker.InterStageWorker`):
    the source's export and send, the destination's receive and import, the probe."""

    def _kv_sender(self) -> KVSender:
        if not hasattr(self, "_kv_sends"):
            self._kv_sends = KVSender()
        return self._kv_sends

    def gen_migrate(self, role: str, kv_to: dict, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                    ) -> dict:
        """Abort every sample still in the engine (the freed source of a migration); the
        samples in ``kv_to`` (``sample_id -> destination device``) that hold a KV cache
        here have it exported and sent to their destination, bucketed per destination.

        Returns ``{"samples": [partial Sample], "parcels": [KVParcel], "export_s"}``;
        a sample in a parcel is resumed by the parcel's destination, the others by
        re-prefill."""
        engine = self._gen_engine(role)
        t0 = time.perf_counter()
        can_kv = hasattr(engine, "export_kv")
        samples, by_dst = [], {}
        for p in engine.progress():
            if can_kv and p.sample_id in kv_to:
                partial, kv = engine.export_kv(p.sample_id)
                if kv is not None:
                    by_dst.setdefault(int(kv_to[p.sample_id]), []).append((partial, kv))
                    continue
            else:
                partial = engine.abort(p.sample_id)
            samples.append(partial)
        parcels = []
        sender = self._kv_sender()
        for dst, items in sorted(by_dst.items()):
            kvs = [kv for _, kv in items]
            layers, heads, head_dim, dtype = engine.kv_layout()
            flat = pack(kvs)
            buckets = bucket_sizes(flat.numel(), max(1, bucket_bytes // flat.element_size()))
            sender.send(dst, flat, buckets)
            parcels.append(KVParcel(self.device, dst, [s for s, _ in items],
                                    [kv.shape[3] for kv in kvs], (layers, heads, head_dim),
                                    str(dtype).removeprefix("torch."), buckets))
        export_s = time.perf_counter() - t0
        for parcel in parcels:
            parcel.export_s = export_s
        return {"samples": samples, "parcels": parcels, "export_s": export_s}

    def kv_import(self, engine, parcels) -> list[tuple[int, float]]:
        """Receive ``parcels`` and continue their samples from the caches: the measured
        ``(bytes, seconds)`` of each transfer (receive and import)."""
        from fusedrl.generation.engine import Request

        points = []
        for parcel in parcels:
            t0 = time.perf_counter()
            kvs, _ = receive(parcel, self.torch_device)
            for sample, kv in zip(parcel.samples, kvs):
                engine.import_kv(Request.resume(sample), kv)
            points.append((parcel.nbytes(), time.perf_counter() - t0))
        return points

    def kv_probe(self, peer: int, sizes: list[int], send: bool) -> list[tuple[int, float]]:
        """Time transfers of ``sizes`` bytes to (``send``) or from ``peer`` as KV
        migration sends them (both ends called together): the receiver's ``(bytes,
        seconds)``, the points that set the cost model's transfer terms before any
        migration. A one-element exchange first lines the two ends up, so that the
        timed transfer does not include the wait for the other end's call."""
        out = []
        token = torch.zeros(1, device=self.torch_device)
        for nbytes in sizes:
            buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32,
                              device=self.torch_device)
            if send:
                dist.send(token, peer, tag=TAG)
                dist.send(buf, peer, tag=TAG)
                dist.recv(token, peer, tag=TAG)
            else:
                dist.recv(token, peer, tag=TAG)
                t0 = time.perf_counter()
                dist.recv(buf, peer, tag=TAG)
                if buf.device.type == "cuda":
                    torch.cuda.current_stream(buf.device).synchronize()
                out.append((buf.numel() * 4, time.perf_counter() - t0))
                dist.send(token, peer, tag=TAG)
        return out

    def kv_sends_wait(self) -> None:
        """Complete every send this source posted (start of the next iteration)."""
        self._kv_sender().wait_all()


# ---------------------------------------------------------------------- controller side


class KVRouting:
    """The controller's side of one fused iteration's migration: which samples move by
    KV transfer (:meth:`kv_to`), where the parcels wait until their destination's next
    ``gen_run`` (:meth:`route`, :meth:`take`), and what it cost (:meth:`metrics`)."""

    def __init__(self, mode: str, can_kv: bool, instances: list[int]):
        self.mode, self.can_kv = mode, can_kv
        self.instance_of = {dev: i for i, dev in enumerate(instances)}
        self.inbox: dict[int, list[KVParcel]] = {i: [] for i in range(len(instances))}
        self.methods: dict[int, str] = {}
        self.points: list[tuple[int, float]] = []  # measured (bytes, seconds) transfers
        self.kv_samples = self.reprefill_samples = self.kv_bytes = 0
        self.export_s = 0.0
        self.resume_s: list[float] = []  # per destination call that resumed samples

    def kv_to(self, plan: MigrationPlan, src: int, devices: list[int]) -> dict[int, int]:
        """``sample_id -> destination device`` of the samples leaving instance ``src``
        by KV transfer (``devices``: instance -> device)."""
        if not self.methods:
            self.methods = methods(plan, self.mode, self.can_kv)
        return {mv.sample_id: devices[mv.dst] for mv in plan.moves
                if mv.src == src and self.methods[mv.sample_id] == KV_TRANSFER}

    def route(self, out: dict) -> list:
        """Take a source's ``gen_migrate`` reply: its parcels wait for their destination;
        the samples to re-prefill are returned (the caller queues them)."""
        self.export_s = max(self.export_s, out["export_s"])
        for parcel in out["parcels"]:
            self.inbox[self.instance_of[parcel.dst]].append(parcel)
            self.kv_samples += len(parcel.samples)
            self.kv_bytes += parcel.nbytes()
        self.reprefill_samples += len(out["samples"])
        return out["samples"]

    def pending(self, i: int) -> bool:
        return bool(self.inbox[i])

    def take(self, i: int) -> list[KVParcel]:
        """The parcels instance ``i`` receives with its next ``gen_run``."""
        parcels, self.inbox[i] = self.inbox[i], []
        return parcels

    @staticmethod
    def states(parcels: list[KVParcel]) -> list:
        from fusedrl.scheduler.migration import SampleState

        return [SampleState(s.sample_id, len(s.prompt_ids), len(s.response_ids))
                for p in parcels for s in p.samples]

    def observe(self, out: dict) -> None:
        """A ``gen_run`` reply: its measured transfers and resume time."""
        self.points.extend(out.get("kv", ()))
        if self.methods and out.get("resume_s") is not None:  # after this run's migration
            self.resume_s.append(out["resume_s"])

    def metrics(self) -> dict:
        return {"interstage/migrated_kv": self.kv_samples,
                "interstage/migrated_reprefill": self.reprefill_samples,
                "interstage/kv_bytes": self.kv_bytes,
                "interstage/kv_transfer_s": sum(s for _, s in self.points),
                "interstage/migration_export_s": self.export_s,
                "interstage/migration_resume_s": max(self.resume_s, default=0.0)}
