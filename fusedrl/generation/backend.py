"""Generation backends: one narrow interface over the native engine and vLLM.

Lifecycle of a backend (one instance per generation replica)::

    backend = make_backend("native" | "vllm", model, max_batch_size=..., max_seq_len=...,
                           eos_token_ids=..., pad_token_id=...)
    backend.update_weights(named_tensors)     # new weights (full HF-named tensors, or this
    backend.update_weights()                  #   replica's shards); no argument: the model
                                              #   object given at construction was updated
                                              #   in place (native engine: nothing to do)
    samples = backend.generate(requests, params, on_finish)   # or step by step:
    backend.start(params); backend.add(requests)
    while backend.has_unfinished():
        for sample in backend.step(): ...     # finished samples stream out
    partial = backend.abort(sample_id)        # migration: a Sample with finish_reason
    other.add(Request.resume(partial))        #   "aborted", continued on another replica
    backend.release()                         # free the KV cache (devices go to training)
    backend.stop()                            # for good; the backend cannot be used after

Contract shared by every backend:

* ``generate`` returns samples in the order of ``requests``; ``on_finish`` is called on
  each sample as it finishes (the inter-stage scheduler streams it to inference).
* A sample's tokens come from a per-sample random stream seeded by
  ``(params.seed, sample_id)`` and indexed by token position: they do not depend on
  the batch, slot or replica, and a sample resumed elsewhere continues its stream. The
  native and vLLM backends share the sampler (``generation/sampling.py``), so their
  tokens are the same up to float rounding of the logits, sampled or greedy.
* ``Sample.logprobs[k]`` is the log-probability of token ``k`` under
  ``softmax(logits / temperature)`` (temperature 1 when greedy), the distribution that
  the trainer recomputes for PPO's importance ratio.
* ``Request.max_new_tokens`` caps one sample; ``params.ignore_eos`` forces lengths.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Protocol, runtime_checkable

import torch

from fusedrl.generation import fastpath
from fusedrl.generation.engine import GenerationEngine, Request, Sample
from fusedrl.generation.sampling import SamplingParams

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class SampleProgress(NamedTuple):
    """Where one unfinished sample of a backend stands (the migration planner's
    ``SampleState`` plus whether its prompt is in the KV cache yet)."""

    sample_id: int
    prompt_len: int
    generated: int
    started: bool  # prefilled: generating, not waiting in the queue


@runtime_checkable
class GenerationBackend(Protocol):
    """What the trainer and the sample-level scheduler need from a generation replica."""

    name: str

    def start(self, params: SamplingParams) -> None:
        """Set the sampling parameters of the next batch (and allocate the KV cache)."""

    def update_weights(self, weights: NamedTensors | None = None) -> None:
        """Load ``weights`` (HF names) into the generation model in place; ``None`` when
        the model object this backend generates with was already updated in place."""

    def add(self, requests: Request | Iterable[Request]) -> None:
        """Queue samples (new or resumed with :meth:`Request.resume`)."""

    def step(self) -> list[Sample]:
        """Advance every running sample by (at least) one token; return the finished."""

    def has_unfinished(self) -> bool: ...

    def running_ids(self) -> list[int]:
        """Sample ids queued or generating on this replica."""

    def progress(self) -> list[SampleProgress]:
        """Every unfinished sample (queued or generating) and how far it is."""

    def abort(self, sample_id: int) -> Sample:
        """Stop a sample and return it as generated so far (``finish_reason="aborted"``)."""

    def generate(self, requests: Iterable[Request], params: SamplingParams,
                 on_finish: Callable[[Sample], None] | None = None) -> list[Sample]: ...

    def release(self) -> None:
        """Free the KV cache; the next :meth:`start` allocates it again."""

    def stop(self) -> None:
        """Shut down for good."""


# -------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., GenerationBackend]] = {}


def register_backend(name: str):
    """Class decorator: make a backend constructible as ``make_backend(name, model, ...)``."""

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"generation backend {name!r} is already registered")
        _REGISTRY[name] = factory
        factory.name = name
        return factory

    return deco


def get_backend(name: str) -> Callable[..., GenerationBackend]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown generation backend {name!r}; known: "
                         f"{sorted(_REGISTRY)}") from None


def available_backends() -> list[str]:
    """Registered names (a registered backend may still need an optional package)."""
    _load_builtin()
    return sorted(_REGISTRY)


def make_backend(name: str, model, **kwargs) -> GenerationBackend:
    """Build backend ``name`` on ``model`` (a fusedrl ``Llama``, full or this tp rank's).

    Keyword arguments: ``max_batch_size``, ``max_seq_len``, ``eos_token_ids``,
    ``pad_token_id``, ``process_group`` (a one-rank group of this process, for a backend
    that sets up distributed state of its own inside a multi-rank world), plus the
    backend's own (see each backend's class).
    """
    return get_backend(name)(model, **kwargs)


def backend_from_config(config, model, *, eos_token_ids: Iterable[int], pad_token_id: int,
                        **kwargs) -> GenerationBackend:
    """The ``generation.backend`` of a :class:`~fusedrl.config.Config` on ``model``, sized by
    its ``generation`` and ``data`` sections (``kwargs``: e.g. ``process_group``)."""
    g = config.generation
    if g.backend == "native":
        kwargs.setdefault("packed_weight_bytes", int(g.packed_weights_gib * (1 << 30)))
    return make_backend(g.backend, model, max_batch_size=g.max_batch_size,
                        max_seq_len=config.data.max_prompt_len + g.max_new_tokens,
                        eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, **kwargs)


def _load_builtin() -> None:
    # vllm_backend imports vllm lazily, so registering it costs nothing without vllm.
    import fusedrl.generation.vllm_backend  # noqa: F401


# -------------------------------------------------------------------------- native


@register_backend("native")
class NativeBackend:
    """:class:`GenerationEngine` behind the backend interface.

    The engine generates with the model object it was given, so weights updated in place
    by training or reallocation are used by the next step; ``update_weights(tensors)``
    copies named full (or this rank's) tensors into it.
    """

    def __init__(self, model, *, max_batch_size: int = 64, max_seq_len: int | None = None,
                 eos_token_ids: Iterable[int] = (), pad_token_id: int = 0,
                 process_group=None, packed_weight_bytes: int = 3 << 30):
        del process_group  # the native engine runs no collectives of its own
        self.model = model
        self.engine = GenerationEngine(model, max_batch_size=max_batch_size,
                                       max_seq_len=max_seq_len, eos_token_ids=eos_token_ids,
                                       pad_token_id=pad_token_id,
                                       packed_weight_bytes=packed_weight_bytes)
        self._stopped = False

    def _check(self) -> None:
        if self._stopped:
            raise RuntimeError("generation backend used after stop()")

    def weight_cache_bytes(self) -> tuple[int, int]:
        """``(held, planned)`` bytes of the engine's own weight copies (the fast path's
        fused and MKL-packed weights, ``generation.packed_weights_gib``): held now, and
        once built. ``(0, 0)`` when the model runs without the fast path."""
        fwd = self.engine._forward
        if not isinstance(fwd, fastpath.FastForward):
            return 0, 0
        return fwd.held_bytes(), fwd.planned_bytes()

    def start(self, params: SamplingParams) -> None:
        self._check()
        self.engine.start(params)

    @torch.no_grad()
    def update_weights(self, weights: NamedTensors | None = None) -> None:
        self._check()
        if weights is None:
            return
        own = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in own:
                raise KeyError(f"update_weights: the model has no parameter {name!r}")
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model holds {tuple(own[name].shape)}")
            own[name].copy_(tensor)

    def add(self, requests) -> None:
        self._check()
        self.engine.add(requests)

    def step(self) -> list[Sample]:
        self._check()
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def running_ids(self) -> list[int]:
        return [r.sample_id for r in self.engine.queue] + self.engine.running_ids()

    def progress(self) -> list[SampleProgress]:
        e = self.engine
        return ([SampleProgress(s.req.sample_id, len(s.req.prompt_ids), len(s.req.response_ids),
                                True) for s in e.slots if s is not None]
                + [SampleProgress(r.sample_id, len(r.prompt_ids), len(r.response_ids), False)
                   for r in e.queue])

    def abort(self, sample_id: int) -> Sample:
        return self.engine.abort(sample_id)

    # KV migration (RLHFuse §4): a backend that has these moves a sample's KV cache
    # instead of re-prefilling it on the destination (fusedrl.interstage.kv_migration).

    def kv_layout(self) -> tuple[int, int, int, torch.dtype]:
        return self.engine.kv_layout()

    def export_kv(self, sample_id: int) -> tuple[Sample, torch.Tensor | None]:
        return self.engine.export_kv(sample_id)

    def import_kv(self, request: Request, kv: torch.Tensor) -> None:
        self._check()
        self.engine.import_kv(request, kv)

    def generate(self, requests, params, on_finish=None) -> list[Sample]:
        self._check()
        return self.engine.generate(requests, params, on_finish)

    def release(self) -> None:
        self.engine.release()

    def stop(self) -> None:
        self.engine.release()
        self._stopped = True


__all__ = ["GenerationBackend", "NativeBackend", "SampleProgress", "register_backend",
           "get_backend", "available_backends", "make_backend", "backend_from_config"]
