"""Run a model whose attention head size an engine lacks kernels for, exactly, by padding
every head with zeros to a size it supports.

vLLM's CPU attention has kernels for head sizes 32, 64, 80, ... only; the default
``tiny`` preset has head_dim 16. Attention with head size ``d`` equals attention with
head size ``p > d`` when:

- each head's q/k/v rows are placed in a ``p``-row head with zeros elsewhere, so
  ``q . k`` and the value vectors are unchanged and ``o_proj`` reads zeros from the
  padding (its matching columns are zero);
- RoPE pairs still line up: Llama's (GPT-NeoX) rotation pairs dimension ``i`` with
  ``i + d/2`` at frequency ``theta^(-2i/d)``. Original dimensions ``[0, d/2)`` go to
  ``[0, d/2)`` and ``[d/2, d)`` to ``[p/2, p/2 + d/2)``, so the padded pair
  ``(i, i + p/2)`` is the original ``(i, i + d/2)``; with ``theta' = theta^(p/d)`` its
  frequency ``theta'^(-2i/p)`` is the original one;
- the softmax scale ``1/sqrt(p)`` becomes ``1/sqrt(d)`` by scaling q by ``sqrt(p/d)``.

So logits equal the unpadded model's up to float rounding. Weight updates go through
:meth:`HeadPadding.tensor` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fusedrl.models.config import ModelConfig


@dataclass(frozen=True)
class HeadPadding:
    """Pads heads of size ``config.head_dim`` to ``size``."""

    config: ModelConfig
    size: int

    def __post_init__(self) -> None:
        d = self.config.head_dim
        if self.size <= d or self.size % 2:
            raise ValueError(f"head padding from {d} to {self.size}: the padded size must be "
                             f"even and larger")

    @staticmethod
    def choose(config: ModelConfig, supported: list[int]) -> "HeadPadding | None":
        """``None`` when ``supported`` has the model's head size, else the padding to the
        smallest supported size above it (a ``ValueError`` when there is none)."""
        d = config.head_dim
        if d in supported:
            return None
        larger = sorted(s for s in supported if s > d and s % 2 == 0)
        if not larger:
            raise ValueError(f"model head_dim={d}: the engine supports head sizes {supported}, "
                             f"none larger to pad to")
        return HeadPadding(config, larger[0])

    @property
    def padded_config(self) -> ModelConfig:
        c = self.config
        return replace(c, head_dim=self.size,
                       rope_theta=c.rope_theta ** (self.size / c.head_dim))

    def _heads(self, w: torch.Tensor, heads: int, dim: int, scale: float) -> torch.Tensor:
        d, p = self.config.head_dim, self.size
        w = w.movedim(dim, 0)
        rest = w.shape[1:]
        src = w.reshape(heads, d, *rest)
        out = src.new_zeros(heads, p, *rest)
        half = d // 2
        out[:, :half] = src[:, :half]
        out[:, p // 2:p // 2 + half] = src[:, half:]
        if scale != 1.0:
            out.mul_(scale)
        return out.reshape(heads * p, *rest).movedim(0, dim)

    def tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The padded model's tensor ``name`` from the original model's ``t``."""
        c = self.config
        if name.endswith("self_attn.q_proj.weight"):
            return self._heads(t, c.num_heads, 0, math.sqrt(self.size / c.head_dim))
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return self._heads(t, c.num_kv_heads, 0, 1.0)
        if name.endswith("self_attn.o_proj.weight"):
            return self._heads(t, c.num_heads, 1, 1.0)
        if ".self_attn." in name:
            raise ValueError(f"head padding: unexpected attention tensor {name!r}")
        return t


__all__ = ["HeadPadding"]
