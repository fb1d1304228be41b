"""Native generation engine: batched sampling with a slot KV cache and continuous batching.

Lifecycle::

    engine = GenerationEngine(model, max_batch_size=64, max_seq_len=512, eos_token_ids=(2,))
    samples = engine.generate(requests, params)          # all at once, or step by step:
    engine.start(params); engine.add(requests)
    while engine.has_unfinished():
        for sample in engine.step(): ...                 # finished samples stream out
    partial = engine.abort(sample_id)                    # for migration: resume elsewhere
                                                          # with Request.resume(partial)
    partial, kv = engine.export_kv(sample_id)            # or move its KV cache instead:
    other.import_kv(Request.resume(partial), kv)         #   no re-prefill (RLHFuse §4)

The model is used in place: weights updated by training or reallocation between calls
are picked up by the next call. A finished sample's slot is refilled from the queue at
the next step (continuous batching, Yu et al. OSDI'22 "Orca"); on the fast path
(``fastpath.FastForward``) the admitted samples' prefill and the running samples' decode
share that step's forward (Orca's iteration-level batching: one pass over the weights).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from fusedrl.generation import fastpath
from fusedrl.generation.sampling import SamplingParams, sample_tokens
from fusedrl.models.llama import gather_logits


@dataclass
class Request:
    """One sample to generate. ``response_ids``/``logprobs`` continue a migrated sample."""

    sample_id: int
    prompt_ids: list[int]
    max_new_tokens: int | None = None
    """Per-sample cap (benchmark mode forces lengths with it plus ``ignore_eos``)."""
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @classmethod
    def resume(cls, sample: "Sample") -> "Request":
        return cls(sample.sample_id, list(sample.prompt_ids), sample.max_new_tokens,
                   list(sample.response_ids), list(sample.logprobs))


@dataclass
class Sample:
    """A generated (or, when aborted, partially generated) sample."""

    sample_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "length" | "aborted"
    max_new_tokens: int | None = None


@dataclass
class _Slot:
    req: Request
    max_new: int
    seq_len: int = 0  # tokens whose keys/values are in the cache


class GenerationEngine:
    """Generates on one model instance (one dp replica of the generation placement)."""

    def __init__(self, model, *, max_batch_size: int = 64, max_seq_len: int | None = None,
                 eos_token_ids: Iterable[int] = (), pad_token_id: int = 0,
                 packed_weight_bytes: int = 3 << 30):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        if self.max_seq_len > model.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.pad = pad_token_id
        self.cache = None
        self.params = SamplingParams()
        self.queue: deque[Request] = deque()
        self.slots: list[_Slot | None] = [None] * max_batch_size
        self.tokens_generated = 0
        self._imported: dict[int, torch.Tensor] = {}  # queued sample -> its KV (import_kv)
        # A full model on one rank runs through the lean forward (same math, fewer ops).
        self._forward = (fastpath.FastForward(model, pack_rows=max_batch_size,
                                              pack_bytes=packed_weight_bytes)
                         if fastpath.supports(model) else model)

    # ------------------------------------------------------------------ lifecycle

    def start(self, params: SamplingParams) -> None:
        if self.has_unfinished():
            raise RuntimeError("start() while samples are still generating")
        self.params = params
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_batch_size, self.max_seq_len)

    def release(self) -> None:
        """Free the KV cache and the fast path's prepared weights (e.g. before the devices
        are used for training; an update changes the weights, so they are rebuilt
        anyway)."""
        self.cache = None
        if isinstance(self._forward, fastpath.FastForward):
            self._forward.release()

    def add(self, requests: Request | Iterable[Request]) -> None:
        if isinstance(requests, Request):
            requests = [requests]
        for r in requests:
            max_new = r.max_new_tokens or self.params.max_new_tokens
            total = len(r.prompt_ids) + max_new
            if not r.prompt_ids:
                raise ValueError(f"sample {r.sample_id}: empty prompt")
            if total > self.max_seq_len:
                raise ValueError(f"sample {r.sample_id}: prompt of {len(r.prompt_ids)} tokens + "
                                 f"{max_new} new tokens exceeds max_seq_len={self.max_seq_len}")
            # A copy: the engine appends to it, the caller's request stays as it was.
            self.queue.append(Request(r.sample_id, list(r.prompt_ids), r.max_new_tokens,
                                      list(r.response_ids), list(r.logprobs)))

    def has_unfinished(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.slots)

    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    def running_ids(self) -> list[int]:
        return [s.req.sample_id for s in self.slots if s is not None]

    def abort(self, sample_id: int) -> Sample:
        """Stop a queued or running sample and return it as generated so far."""
        for i, s in enumerate(self.slots):
            if s is not None and s.req.sample_id == sample_id:
                self.slots[i] = None
                return self._as_sample(s.req, "aborted")
        for r in list(self.queue):
            if r.sample_id == sample_id:
                self.queue.remove(r)
                self._imported.pop(sample_id, None)
                return self._as_sample(r, "aborted")
        raise KeyError(f"sample {sample_id} is not in this engine")

    # ------------------------------------------------------------ KV migration

    def kv_layout(self) -> tuple[int, int, int, torch.dtype]:
        """``(layers, kv_heads, head_dim, dtype)`` of this engine's cache: an exported KV
        of ``n`` tokens is a ``[layers, 2, kv_heads, n, head_dim]`` tensor of ``dtype``."""
        attn = next(iter(self.model.model.layers.values())).self_attn
        p = next(self.model.parameters())
        return len(self.model.stage.layers), attn.num_kv_heads, attn.head_dim, p.dtype

    def export_kv(self, sample_id: int) -> tuple[Sample, torch.Tensor | None]:
        """Abort a sample and return it with its KV cache: ``[layers, 2, kv_heads, n,
        head_dim]`` for the ``n = prompt + generated - 1`` tokens whose keys and values are
        cached (the last generated token is fed by the next decode step), or ``None`` for a
        sample that holds none here (still queued: the destination prefills it anyway).

        The KV migration of RLHFuse §4: the destination continues decoding from it
        (:meth:`import_kv`) without re-prefill; with the per-sample random streams the
        tokens and log-probs are those of an unmigrated run."""
        for i, s in enumerate(self.slots):
            if s is not None and s.req.sample_id == sample_id:
                n, c = s.seq_len, self.cache
                kv = torch.stack([torch.stack((c.k[j][i, :, :n], c.v[j][i, :, :n]))
                                  for j in c.k])  # layers in order
                self.slots[i] = None
                return self._as_sample(s.req, "aborted"), kv
        kv = self._imported.get(sample_id)
        return self.abort(sample_id), kv

    def import_kv(self, request: Request, kv: torch.Tensor) -> None:
        """Continue ``request`` (``Request.resume`` of an exported sample) from its KV cache
        ``kv`` (:meth:`export_kv`'s layout, ``n = prompt + generated - 1`` tokens) instead of
        re-prefilling it: placed in a free slot now, or queued until one frees."""
        layers, heads, head_dim, dtype = self.kv_layout()
        n = len(request.prompt_ids) + len(request.response_ids) - 1
        if not request.response_ids:
            raise ValueError(f"sample {request.sample_id}: import_kv needs a sample with "
                             "generated tokens (a queued one is prefilled)")
        if tuple(kv.shape) != (layers, 2, heads, n, head_dim):
            raise ValueError(f"sample {request.sample_id}: KV of shape {tuple(kv.shape)}, "
                             f"this engine needs {(layers, 2, heads, n, head_dim)}")
        self.add(request)  # validates it and queues a copy
        self._imported[request.sample_id] = kv.to(dtype)
        free = [i for i, s in enumerate(self.slots) if s is None]
        if free and self.cache is not None:
            req = self.queue.pop()  # the copy just queued
            self._place(free[0], req)

    def _place(self, i: int, req: Request) -> None:
        """Put an imported sample into slot ``i``: its KV into the cache, ready to decode."""
        kv = self._imported.pop(req.sample_id)
        n = kv.shape[3]
        for layer, j in enumerate(self.cache.k):
            self.cache.k[j][i, :, :n].copy_(kv[layer, 0])
            self.cache.v[j][i, :, :n].copy_(kv[layer, 1])
        self.slots[i] = _Slot(req, req.max_new_tokens or self.params.max_new_tokens, seq_len=n)

    # ---------------------------------------------------------------------- steps

    @torch.inference_mode()
    def step(self) -> list[Sample]:
        """Admit queued samples into free slots (prefill), then decode one token for every
        running sample. Returns the samples that finished in this step."""
        finished: list[Sample] = []
        decoding = [i for i, s in enumerate(self.slots) if s is not None]
        admitted = []
        for i, s in enumerate(self.slots):
            if s is None and self.queue:
                req = self.queue.popleft()
                if req.sample_id in self._imported:  # its KV arrived: decode, no prefill
                    self._place(i, req)
                    decoding.append(i)
                    continue
                self.slots[i] = _Slot(req, req.max_new_tokens or self.params.max_new_tokens)
                admitted.append(i)
        if admitted and decoding and isinstance(self._forward, fastpath.FastForward):
            # One forward for both: on CPU a step costs a pass over the weights.
            self._prefill(admitted, finished, decoding)
            return finished
        if admitted:
            self._prefill(admitted, finished)
        if decoding:
            self._decode(decoding, finished)
        return finished

    def generate(self, requests: Iterable[Request], params: SamplingParams,
                 on_finish: Callable[[Sample], None] | None = None) -> list[Sample]:
        """Generate every request; samples come back in the order of ``requests``."""
        return run_to_completion(self, requests, params, on_finish)

    # ------------------------------------------------------------------ internals

    def _device(self):
        return next(self.model.parameters()).device

    def _prefill_group(self, slot_ids: list[int], dev) -> tuple:
        seqs = [self.slots[i].req.prompt_ids + self.slots[i].req.response_ids for i in slot_ids]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
        positions = torch.arange(width).expand(len(seqs), width)
        last = torch.tensor([len(s) - 1 for s in seqs])
        for i, s in zip(slot_ids, seqs):
            self.slots[i].seq_len = len(s)
        return (ids.to(dev), positions.to(dev), torch.tensor(slot_ids, device=dev),
                last.to(dev))

    def _decode_group(self, slot_ids: list[int], dev) -> tuple:
        ids = torch.tensor([[self.slots[i].req.response_ids[-1]] for i in slot_ids])
        positions = torch.tensor([[self.slots[i].seq_len] for i in slot_ids])
        for i in slot_ids:
            self.slots[i].seq_len += 1
        return (ids.to(dev), positions.to(dev), torch.tensor(slot_ids, device=dev),
                torch.zeros(len(slot_ids), dtype=torch.long, device=dev))

    def _prefill(self, slot_ids: list[int], finished: list[Sample],
                 decoding: list[int] = ()) -> None:
        """Prefill ``slot_ids``; with ``decoding`` (fast path only), decode those slots in
        the same forward."""
        dev = self._device()
        groups = [self._prefill_group(slot_ids, dev)]
        if decoding:
            groups.append(self._decode_group(decoding, dev))
            logits = self._forward.forward_groups(groups, self.cache)
            self._sample(list(slot_ids) + list(decoding), logits, finished)
            return
        ids, positions, slots, last = groups[0]
        logits = self._forward(ids, positions, self.cache.bind(slots), select=last)
        self._sample(slot_ids, logits, finished)

    def _decode(self, slot_ids: list[int], finished: list[Sample]) -> None:
        ids, positions, slots, select = self._decode_group(slot_ids, self._device())
        logits = self._forward(ids, positions, self.cache.bind(slots), select=select)
        self._sample(slot_ids, logits, finished)

    def _sample(self, slot_ids: list[int], logits: torch.Tensor, finished: list[Sample]) -> None:
        logits = gather_logits(logits, self.model.tp_group)
        reqs = [self.slots[i].req for i in slot_ids]
        tokens, logps = sample_tokens(logits, self.params, [r.sample_id for r in reqs],
                                      [len(r.response_ids) for r in reqs])
        for i, req, tok, lp in zip(slot_ids, reqs, tokens.tolist(), logps.tolist()):
            req.response_ids.append(tok)
            req.logprobs.append(lp)
            self.tokens_generated += 1
            reason = None
            if tok in self.eos and not self.params.ignore_eos:
                reason = "eos"
            elif len(req.response_ids) >= self.slots[i].max_new:
                reason = "length"
            if reason is not None:
                finished.append(self._as_sample(req, reason))
                self.slots[i] = None

    def _as_sample(self, req: Request, reason: str) -> Sample:
        return Sample(req.sample_id, list(req.prompt_ids), list(req.response_ids),
                      list(req.logprobs), reason, req.max_new_tokens)


def run_to_completion(engine, requests: Iterable[Request], params: SamplingParams,
                      on_finish: Callable[[Sample], None] | None = None) -> list[Sample]:
    """Drive any step-level engine (``start/add/has_unfinished/step``) until every request
    finished; ``on_finish`` sees each sample as it completes. Samples in request order."""
    requests = list(requests)
    engine.start(params)
    engine.add(requests)
    done: dict[int, Sample] = {}
    while engine.has_unfinished():
        for s in engine.step():
            done[s.sample_id] = s
            if on_finish is not None:
                on_finish(s)
    return [done[r.sample_id] for r in requests]
