"""Sampling parameters and per-sample random streams.

Each sample draws its k-th token from a counter-based stream: the uniform number for
(seed, sample_id, k) is a hash of the three, so a sample's tokens do not depend on
which batch, slot or device generated it, and a sample that migrates to another
instance mid-generation continues the same stream (RLHFuse §4 migration keeps the
samples identical to unmigrated ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn (vLLM/HF names)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    max_new_tokens: int = 64
    """Stop a sample after this many generated tokens."""
    ignore_eos: bool = False
    """Do not stop at end-of-sequence tokens (benchmark mode with forced lengths)."""
    seed: int = 0
    """Seed of the per-sample streams."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer.
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def stream_uniform(seed: int, sample_ids, steps) -> np.ndarray:
    """Uniform [0, 1) draw number ``steps[i]`` of the stream of ``sample_ids[i]``."""
    sid = np.asarray(sample_ids, dtype=np.uint64)
    step = np.asarray(steps, dtype=np.uint64)
    x = _splitmix64(np.full_like(sid, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
    x = _splitmix64(x ^ sid)
    x = _splitmix64(x ^ step)
    # 53 random bits -> float64 in [0, 1)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the tokens outside top-k / the top-p nucleus (rows renormalised by the caller)."""
    if top_k and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        # Holtzman et al. 2020: keep tokens whose preceding mass is below top_p.
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs


def sample_tokens(logits: torch.Tensor, params: SamplingParams, sample_ids, steps
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens [B], log-probs [B]).

    The log-prob is that of the drawn token under ``softmax(logits / temperature)``
    (temperature 1 when greedy), before top-k/top-p truncation: the distribution the
    trainer recomputes for PPO's importance ratio.
    """
    logits = logits.float()
    temp = params.temperature if params.temperature > 0 else 1.0
    # x / 1.0 == x exactly: skip a pass over [B, V] at temperature 1 (and greedy).
    logp = torch.log_softmax(logits / temp if temp != 1.0 else logits, dim=-1)
    if params.temperature == 0:
        # max(dim) returns the first maximal index, as argmax does, and is ~3x faster on CPU.
        tokens = logits.max(dim=-1).indices
    else:
        probs = filter_probs(logp.exp(), params.top_k, params.top_p)
        cdf = torch.cumsum(probs.double(), dim=-1)
        u = torch.from_numpy(stream_uniform(params.seed, sample_ids, steps)).to(cdf.device)
        target = u.unsqueeze(-1) * cdf[:, -1:]
        # The number of cdf entries <= target; the cdf of non-negative probabilities is
        # non-decreasing, so a binary search gives the count a full comparison would.
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        tokens = tokens.clamp_(max=logits.shape[-1] - 1)
        # Never land on a token with zero probability (cdf flat at the end).
        zero = probs.gather(-1, tokens[:, None]).squeeze(-1) == 0
        if zero.any():
            tokens[zero] = probs[zero].argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
