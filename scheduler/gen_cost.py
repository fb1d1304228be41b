"""Cost model of generation and inference on one instance (RLHFuse §4).

Inter-stage fusion (RLHFuse, arXiv 2409.13221 §4) trades three costs against each
other: decoding the long tail on fewer instances (each decode step gets a larger
batch), moving the tail samples (KV-cache transfer or re-prefill), and loading the
reference/reward/critic weights onto the instances the migration frees. The paper
picks the migration threshold by simulating the iteration with a cost model
profiled on the real engine; :class:`GenCostModel` is that model, and
:meth:`GenCostModel.fit` calibrates it from measured decode steps.

Decode step time on one instance with ``B`` running sequences holding ``S``
context tokens in all (``S = B * mean context``)::

    t(B, S) = a + b * B + c * S

``a`` is the per-step cost independent of the batch (reading the weights: the
memory-bound part that makes small batches cheap per sample), ``b`` the
per-sequence cost, ``c`` the per-context-token cost (attention reading the KV
cache). Throughput ``B / t`` grows with ``B`` towards ``1 / (b + c * ctx)``;
``bs_max`` (RLHFuse's *BSmax*) is the batch at which it saturates, i.e. a larger
batch brings no worthwhile throughput, so the tail may be packed up to ``bs_max``
sequences per instance without slowing it much.

All times are seconds, sizes bytes, bandwidth bytes per second.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class GenCostModel:
    """Per-instance generation and inference costs.

    The defaults are illustrative, of the right order for a 7B model on one
    Hopper GPU in fp16 (weights read in ~7 ms, 0.5 MiB of KV per token, 40 GB of
    KV capacity, 25 GB/s between instances); calibrate the decode terms with
    :meth:`fit` and set the rest from measurements of the real engine.
    """

    decode_base_s: float = 0.012
    """``a``: decode step time independent of the batch."""
    decode_per_seq_s: float = 5e-5
    """``b``: decode step time per running sequence."""
    decode_per_ctx_token_s: float = 2.5e-7
    """``c``: decode step time per context token of the batch (attention)."""
    bs_max: int = 128
    """RLHFuse's BSmax: the decode batch size that saturates an instance."""
    prefill_base_s: float = 0.0
    """Fixed cost of one prefill call (admission or re-prefill)."""
    prefill_per_token_s: float = 4e-5
    """Prefill time per prompt (or prompt + generated) token."""
    infer_per_sample_s: float = 0.0
    """Inference (reference log-probs + reward + critic values) fixed cost per sample."""
    infer_per_token_s: float = 1.2e-4
    """Inference time per token of prompt + response, all inference models together."""
    kv_bytes_per_token: float = 524288.0
    """KV-cache bytes one token holds (all layers, keys and values)."""
    kv_capacity_bytes: float = 40e9
    """``C``: KV-cache capacity of one instance."""
    transfer_bandwidth: float = 25e9
    """Bytes per second between two instances (KV-cache migration)."""
    transfer_latency_s: float = 0.0
    """Fixed cost of one KV-cache transfer."""
    weight_load_s: float = 1.5
    """Time to load the inference models' weights onto an instance (reallocation)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"GenCostModel.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"GenCostModel.{f.name} must be finite and >= 0, got {value}")
        if self.bs_max < 1 or int(self.bs_max) != self.bs_max:
            raise ValueError(f"GenCostModel.bs_max must be an integer >= 1, got {self.bs_max}")
        if self.transfer_bandwidth <= 0:
            raise ValueError("GenCostModel.transfer_bandwidth must be > 0, "
                             f"got {self.transfer_bandwidth}")
        if self.kv_capacity_bytes <= 0:
            raise ValueError("GenCostModel.kv_capacity_bytes must be > 0, "
                             f"got {self.kv_capacity_bytes}")
        if self.decode_base_s + self.decode_per_seq_s <= 0:
            raise ValueError("GenCostModel: decode_base_s + decode_per_seq_s must be > 0 "
                             "(a decode step cannot be free)")

    # -- elementary costs -------------------------------------------------------------

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        """One decode step of ``batch`` sequences holding ``context_tokens`` in all."""
        if batch <= 0:
            return 0.0
        return (self.decode_base_s + self.decode_per_seq_s * batch
                + self.decode_per_ctx_token_s * context_tokens)

    def prefill_s(self, tokens: int) -> float:
        """Prefill of ``tokens`` tokens (0 tokens: no prefill call at all)."""
        return 0.0 if tokens <= 0 else self.prefill_base_s + self.prefill_per_token_s * tokens

    def infer_s(self, tokens: int) -> float:
        """Inference (ref + reward + critic) of one sample of ``tokens`` tokens."""
        return self.infer_per_sample_s + self.infer_per_token_s * tokens

    def kv_bytes(self, tokens: int) -> float:
        return self.kv_bytes_per_token * tokens

    def kv_transfer_s(self, tokens: int) -> float:
        """Moving the KV cache of a ``tokens``-long sample to another instance."""
        return self.transfer_latency_s + self.kv_bytes(tokens) / self.transfer_bandwidth

    def reprefill_s(self, tokens: int) -> float:
        """Rebuilding a ``tokens``-long sample's KV cache on the destination by prefill."""
        return self.prefill_s(tokens)

    def decode_throughput(self, batch: int, context: float) -> float:
        """Tokens per second at ``batch`` sequences of ``context`` tokens each."""
        return batch / self.decode_step_s(batch, batch * context)

    # -- calibration ------------------------------------------------------------------

    @classmethod
    def fit(cls, profile_points: Iterable[Sequence[float]], *,
            prefill_points: Iterable[Sequence[float]] | None = None,
            bs_max: int | None = None, saturation: float = 0.9,
            **other: float) -> "GenCostModel":
        """Least-squares fit of the decode (and optionally prefill) terms.

        ``profile_points``: measured ``(batch, context, seconds)`` decode steps,
        ``context`` the mean context length of a sequence in the batch (so the batch
        holds ``batch * context`` tokens). The coefficients are constrained to be
        non-negative (the best non-negative subset fit). ``prefill_points``:
        ``(tokens, seconds)`` prefill calls, fitted to ``prefill_base_s +
        prefill_per_token_s * tokens``. ``bs_max``, when not given, is the smallest
        batch whose modelled throughput at the profiled mean context reaches
        ``saturation`` of its asymptote ``1 / (b + c * context)``. ``other`` sets the
        remaining fields.
        """
        pts = np.asarray(list(profile_points), dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError("profile_points must be (batch, context, seconds) triples, "
                             f"got an array of shape {pts.shape}")
        if len(pts) < 3:
            raise ValueError(f"profile_points: need at least 3 points, got {len(pts)}")
        if (pts[:, 0] < 1).any() or (pts[:, 1] < 0).any() or (pts[:, 2] <= 0).any():
            raise ValueError("profile_points: need batch >= 1, context >= 0, seconds > 0")
        if not 0 < saturation < 1:
            raise ValueError(f"saturation must be in (0, 1), got {saturation}")
        batch, context, secs = pts.T
        design = np.stack([np.ones_like(batch), batch, batch * context], axis=1)
        # a decode step is never free: the fit keeps a base or a per-sequence term (with
        # points proportional to batch x context the best fit would have neither)
        a, b, c = _nonneg_lstsq(design, secs, require_any=(0, 1))
        kwargs: dict[str, float] = dict(decode_base_s=a, decode_per_seq_s=b,
                                        decode_per_ctx_token_s=c)
        if prefill_points is not None:
            pp = np.asarray(list(prefill_points), dtype=np.float64)
            if pp.ndim != 2 or pp.shape[1] != 2 or len(pp) < 2:
                raise ValueError("prefill_points must be at least 2 (tokens, seconds) pairs")
            p0, p1 = _nonneg_lstsq(np.stack([np.ones(len(pp)), pp[:, 0]], axis=1), pp[:, 1])
            kwargs.update(prefill_base_s=p0, prefill_per_token_s=p1)
        kwargs.update(other)
        model = cls(**kwargs)
        if bs_max is None:
            bs_max = _saturating_batch(model, float(context.mean()), saturation,
                                       cap=int(batch.max()))
        return replace(model, bs_max=int(bs_max))


def _nonneg_lstsq(design: np.ndarray, y: np.ndarray,
                  require_any: tuple[int, ...] = ()) -> np.ndarray:
    """Least squares with non-negative coefficients for a handful of columns.

    Exact for few columns: the optimum of a convex quadratic over the orthant is the
    unconstrained optimum on the face of its active set, so the best of the
    non-negative subset fits is the constrained optimum. ``require_any``: only subsets
    with a positive coefficient on at least one of these columns count.
    """
    k = design.shape[1]
    best, best_sse = np.zeros(k), float("inf") if require_any else float(np.sum(y * y))
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            coef, *_ = np.linalg.lstsq(design[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            if require_any and not any(c in require_any and v > 0
                                       for c, v in zip(cols, coef)):
                continue
            sse = float(np.sum((design[:, cols] @ coef - y) ** 2))
            if sse < best_sse - 1e-18:
                best, best_sse = np.zeros(k), sse
                best[list(cols)] = coef
    return best


def _saturating_batch(model: GenCostModel, context: float, saturation: float, cap: int) -> int:
    """Smallest batch reaching ``saturation`` of the asymptotic decode throughput.

    Without a per-sequence cost the throughput never saturates within the model;
    the largest profiled batch is then the best evidence, so it is returned.
    """
    per_seq = model.decode_per_seq_s + model.decode_per_ctx_token_s * context
    if per_seq <= 0:
        return max(1, cap)
    # batch / (a + per_seq * batch) >= saturation / per_seq
    # <=> batch >= saturation * a / ((1 - saturation) * per_seq)
    need = saturation * model.decode_base_s / ((1.0 - saturation) * per_seq)
    return max(1, math.ceil(need - 1e-9))
