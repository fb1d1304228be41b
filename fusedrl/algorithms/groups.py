"""Samples grouped by prompt: the ``rollout_n`` responses to one prompt form a group.

Group-relative estimators (GRPO, RLOO, REINFORCE++-baseline) and DAPO's dynamic
sampling compare a sample's score with the other scores of its group. ``index`` gives
the prompt id of each sample (verl's ``uid``): any hashable values (a list of strings
or ints, a numpy array) or an integer tensor. The statistics here are vectorised
(``index_add_`` over dense group ids), so a batch costs O(B) whatever its group count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["group_ids", "group_sizes", "group_mean", "group_std"]


def group_ids(index: Sequence | np.ndarray | torch.Tensor,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Dense group id per sample (``0..G-1`` in order of first appearance) and ``G``.

    Samples with equal ``index`` values share an id; ``index`` may be in any order.
    """
    if isinstance(index, torch.Tensor):
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D (one prompt id per sample), got shape "
                             f"{tuple(index.shape)}")
        keys = index.tolist()
    else:
        keys = index.tolist() if isinstance(index, np.ndarray) else list(index)
    dense: dict = {}
    ids = [dense.setdefault(k, len(dense)) for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device), len(dense)


def group_sizes(gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Number of samples in each sample's group, ``[B]`` (long)."""
    counts = torch.zeros(n_groups, dtype=torch.long, device=gid.device)
    counts.index_add_(0, gid, torch.ones_like(gid))
    return counts[gid]


def group_mean(x: torch.Tensor, gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``x`` over each sample's group, broadcast back to ``[B]``."""
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, gid, x)
    return sums[gid] / group_sizes(gid, n_groups).to(x.dtype)


def group_std(x: torch.Tensor, gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Unbiased (Bessel-corrected, as ``torch.std``) standard deviation of ``x`` over each
    sample's group, ``[B]``; NaN for a group of one sample (callers decide what it means)."""
    n = group_sizes(gid, n_groups).to(x.dtype)
    dev = (x - group_mean(x, gid, n_groups)).square()
    ss = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, gid, dev)[gid]
    return (ss / (n - 1)).sqrt()  # n == 1: 0/0 = NaN
