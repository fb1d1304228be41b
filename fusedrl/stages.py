"""The stages of a PPO iteration: small protocols, each with its lifecycle, and a
registry of implementations per protocol.

One iteration (:class:`fusedrl.trainer.Trainer`, written once)::

    prompts -> Rollout.run        generate, then (or fused with it) score and infer
            -> advantages         token rewards, GAE, whitening (on the controller)
            -> WeightSync.before_update
            -> Update.train       PPO epochs of actor and critic
            -> WeightSync.after_update   new weights to the calls that use them

Implementations:

============  ==========================================================================
stage         implementations (registry name: class)
============  ==========================================================================
rollout       ``local``: the engine and models of one device (:mod:`fusedrl.local`);
              ``ray``: ``actor_gen`` replicas, then inference on each call's placement;
              ``interstage``: sample-level generation with long-tail migration and
              streamed inference on freed devices (RLHFuse §4, :mod:`fusedrl.interstage`)
update        ``local``; ``1f1b``: each model's 1F1B pipelines on its training placement;
              ``fused``: actor and critic in one fused pipeline schedule (RLHFuse §5,
              :mod:`fusedrl.intrastage`)
weight_sync   ``local``: a backend with its own weights (vLLM) reloads them;
              ``realloc``: the reallocation engine reshards training weights into every
              inference placement (ReaLHF, :mod:`fusedrl.realloc`)
============  ==========================================================================

A factory registered under a name takes a :class:`StageContext` and returns the stage;
:func:`fusedrl.runtime.launch.make_trainer` picks the names from the config (and a
user may register a replacement under the same name with ``replace=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from fusedrl.generation import Request, SamplingParams
from fusedrl.rollout import RolloutBatch


@dataclass
class RolloutOutput:
    """What a rollout hands the iteration: the batch and every inference result, row
    ``b`` of each tensor belonging to row ``b`` of ``batch``."""

    batch: RolloutBatch
    old_logp: torch.Tensor
    """[B, R] log-probs of the response under the policy that sampled it (``actor_infer``)."""
    ref_logp: torch.Tensor
    """[B, R] reference-model log-probs."""
    values: torch.Tensor
    """[B, R] critic values."""
    scores: torch.Tensor | None = None
    """[B] reward-model scores; None: rule rewards, computed by the iteration."""
    metrics: dict = field(default_factory=dict)
    """Stage metrics (e.g. ``interstage/*``)."""
    carried: list = field(default_factory=list)
    """Partial rollouts (a run with ``close``): every sample not in ``batch`` -- aborted
    ones as generated so far, finished ones whose group is incomplete -- to carry over
    (:mod:`fusedrl.partial`)."""


@runtime_checkable
class Rollout(Protocol):
    """Generation and inference of one iteration.

    Lifecycle: built once per run (after the models hold their initial weights);
    :meth:`run` once per iteration (:meth:`generate` for validation, between
    iterations); :meth:`close` once at the end.
    """

    def run(self, requests: list[Request], params: SamplingParams,
            close=None) -> RolloutOutput:
        """Generate ``requests`` and compute the inference results of every sample;
        the batch's rows follow ``requests``. With ``close`` (a
        :class:`fusedrl.partial.BatchClose`; partial rollouts, only where the stage
        supports them: ``local`` and ``interstage``): stop once ``close.target`` groups
        are complete; the batch holds those (rows in sample-id order), ``carried`` the
        rest."""

    def generate(self, requests: list[Request], params: SamplingParams) -> list:
        """Samples of ``requests`` (in their order) without inference (validation)."""

    def close(self) -> None: ...


@runtime_checkable
class Update(Protocol):
    """The PPO update of actor and critic (they own the trainable models).

    Lifecycle: built once per run; :meth:`train` once per iteration; :meth:`save` /
    :meth:`load` for checkpoints (weights as Hugging Face directories ``actor/`` and
    ``critic/``, plus optimizer state); :meth:`close` once at the end.
    """

    name: str

    def train(self, batch: RolloutBatch, targets: dict[str, torch.Tensor],
              schedule: list[list[torch.Tensor]]) -> dict[str, float]:
        """One iteration's PPO epochs. ``targets``: ``old_logp``, ``values``,
        ``advantages``, ``returns`` ([B, R]); ``schedule``: per mini-batch, its
        micro-batches' row indices (:func:`fusedrl.update.minibatch_schedule`)."""

    def save(self, directory, tokenizer) -> None: ...

    def load(self, directory) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class WeightSync(Protocol):
    """Weights from the trained models to the calls that use them.

    Lifecycle: built once per run; per iteration :meth:`before_update` (after the
    rollout: inference-only copies may be dropped) and :meth:`after_update` (returns
    metrics: ``perf/realloc_bytes``...); :meth:`after_load` after a checkpoint load.
    """

    def before_update(self) -> None: ...

    def after_update(self) -> dict[str, float]: ...

    def after_load(self) -> None: ...


@dataclass
class StageContext:
    """What a stage factory may use: the config, the setup, the device events log, and
    the runtime's shared objects (``cluster``: the Ray workers; ``models``: the
    single-device models), whichever exist."""

    config: Any
    setup: Any
    events: Any
    cluster: Any = None
    models: Any = None


_REGISTRIES: dict[str, dict[str, Callable[[StageContext], Any]]] = {
    "rollout": {}, "update": {}, "weight_sync": {}}


def register_stage(kind: str, name: str, replace: bool = False):
    """Decorator: register ``factory(context) -> stage`` as ``kind``'s ``name``."""
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown stage kind {kind!r}; known: {', '.join(_REGISTRIES)}")

    def wrap(factory):
        if name in _REGISTRIES[kind] and not replace:
            raise ValueError(f"{kind} stage {name!r} is already registered "
                             f"(pass replace=True to override it)")
        _REGISTRIES[kind][name] = factory
        return factory

    return wrap


def build_stage(kind: str, name: str, context: StageContext):
    try:
        factory = _REGISTRIES[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} stage {name!r}; known: "
                         f"{', '.join(sorted(_REGISTRIES[kind]))}") from None
    return factory(context)


def available_stages(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])
