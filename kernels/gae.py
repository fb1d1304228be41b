"""Generalized Advantage Estimation over right-padded batches.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation", eq. 11-16. For one response of length ``L`` (tokens
``0..L-1`` are valid, the episode ends at EOS so ``V(s_L) = 0``)::

    delta_t = r_t + gamma * V_{t+1} - V_t                      (eq. 11)
    A_t     = sum_{l>=0} (gamma*lam)^l * delta_{t+l}            (eq. 16)
            = delta_t + gamma*lam * A_{t+1},   A_L = 0
    R_t     = A_t + V_t                                         (value target)

Inputs are ``[B, T]`` tensors: token-level ``rewards``, critic ``values`` and a
``mask`` that is 1 on the response tokens and 0 on the right padding. Padded
positions get ``advantages = returns = 0``; values on padded positions are ignored.

Backends:

* ``"numba"``: an ``njit(cache=True)`` loop over numpy arrays (CPU tensors only);
  O(B*T), the fastest on CPU.
* ``"torch"``: a vectorised, device-agnostic implementation (CPU or CUDA). The
  backward recursion is a discounted reverse cumulative sum, computed as a two-level
  blocked scan: within blocks of ``_BLOCK`` tokens a ``[C, C]`` matrix of powers of
  ``gamma*lam`` (a matmul), across blocks the same trick on the block carries.
  Powers only ever appear as ``c**k`` with ``k >= 0``, so nothing overflows.
* ``"cupy"``: a RawKernel for CUDA tensors, one thread per row
  (:mod:`fusedrl.kernels.gae_cuda`; needs the ``gpu`` extra).
* ``"auto"``: numba for CPU tensors when numba imports, cupy for CUDA tensors when cupy
  imports, torch otherwise.

GAE is computed under ``torch.no_grad()``: inputs are detached.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fusedrl.kernels.gae_cuda import gae_cupy, have_cupy

try:  # numba is a core dependency, but keep the torch path usable without it.
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    njit = None
    HAVE_NUMBA = False

__all__ = ["compute_gae", "BACKENDS", "HAVE_NUMBA"]

# Block length of the torch blocked scan: [B, T/C, C] @ [C, C] plus a [T/C, T/C] scan.
_BLOCK = 64


def _check_inputs(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> None:
    if rewards.dim() != 2:
        raise ValueError(
            f"compute_gae expects [B, T] tensors, got rewards of shape {tuple(rewards.shape)}"
        )
    if values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            "compute_gae: rewards, values and mask must have the same shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if not (values.device == rewards.device == mask.device):
        raise ValueError(
            "compute_gae: tensors on different devices: "
            f"{rewards.device}, {values.device}, {mask.device}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"compute_gae: gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"compute_gae: lam must be in [0, 1], got {lam}")


def _check_right_padded(valid: torch.Tensor) -> None:
    """A 0 followed by a 1 in some row means the mask is not 1s-then-0s."""
    if valid.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        row = int((valid[:, 1:] & ~valid[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"compute_gae: mask row {row} is not right-padded (expected 1s then 0s)")


# ----------------------------------------------------------------------------- torch


def _gae_torch(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    # Padding may hold anything (even NaN): select instead of multiplying by the mask.
    rewards, values = torch.where(valid, rewards, zero), torch.where(valid, values, zero)
    # V_{t+1}, with V = 0 after the last valid token (episode ends at EOS).
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    delta = torch.where(valid, rewards + gamma * next_values - values, zero)  # eq. 11

    # A_t = sum_{k>=t} c^(k-t) delta_k  (eq. 16); delta is 0 past the end of each row.
    c = gamma * lam
    C = min(_BLOCK, T)
    n = math.ceil(T / C)
    if n * C != T:
        delta = torch.nn.functional.pad(delta, (0, n * C - T))
    blocks = delta.view(B, n, C)
    local = blocks @ _discount_matrix(c, C, delta)  # within-block sums, [B, n, C]
    # Across blocks: A at the first token of block j is
    #   starts_j = local[j, 0] + c^C * starts_{j+1},
    # again a discounted reverse cumsum, over n block heads with factor c^C.
    heads = local[:, :, 0]  # [B, n]
    if n > 1:
        starts = heads @ _discount_matrix(c**C, n, delta)
        carry = torch.zeros_like(starts)
        carry[:, :-1] = starts[:, 1:]
        # A[j, i] = local[j, i] + c^(C-i) * A[j+1, 0]
        tail = torch.tensor(
            [c ** (C - i) for i in range(C)], dtype=delta.dtype, device=delta.device
        )
        adv = local + carry.unsqueeze(-1) * tail
    else:
        adv = local
    adv = adv.reshape(B, n * C)[:, :T]
    returns = torch.where(valid, adv + values, zero)
    return adv, returns


def _discount_matrix(c: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``D[k, i] = c**(k - i)`` for ``k >= i``, else 0.

    So ``(x @ D)[i] = sum_{k>=i} c^(k-i) x_k``: a discounted reverse cumulative sum.
    """
    idx = torch.arange(n, dtype=torch.float64)
    expo = idx.view(n, 1) - idx.view(1, n)  # k - i
    # 0**0 == 1 keeps c == 0 (lam == 0) exact: A_t = delta_t.
    d = torch.where(
        expo >= 0, torch.pow(torch.tensor(c, dtype=torch.float64), expo.clamp(min=0)), 0.0
    )
    return d.to(dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- numba

if HAVE_NUMBA:

    @njit(cache=True)
    def _gae_kernel(rewards, values, mask, gamma, lam, adv, ret):  # pragma: no cover - jitted
        B, T = rewards.shape
        for b in range(B):
            last = 0.0  # A_{t+1}
            next_value = 0.0  # V_{t+1}; 0 past the end of the response
            for t in range(T - 1, -1, -1):
                if not mask[b, t]:
                    adv[b, t] = 0.0
                    ret[b, t] = 0.0
                    last = 0.0
                    next_value = 0.0
                    continue
                delta = rewards[b, t] + gamma * next_value - values[b, t]  # eq. 11
                last = delta + gamma * lam * last  # A_t = delta_t + gamma*lam*A_{t+1}
                adv[b, t] = last
                ret[b, t] = last + values[b, t]
                next_value = values[b, t]


def _gae_numba(
    rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not HAVE_NUMBA:
        raise ValueError("compute_gae: backend='numba' requested but numba is not installed")
    if rewards.device.type != "cpu":
        raise ValueError(f"compute_gae: backend='numba' needs CPU tensors, got {rewards.device}")
    r = rewards.contiguous().numpy()
    v = values.contiguous().numpy()
    m = valid.contiguous().numpy()
    adv = np.empty_like(r)
    ret = np.empty_like(r)
    _gae_kernel(r, v, m, float(gamma), float(lam), adv, ret)
    return torch.from_numpy(adv), torch.from_numpy(ret)


BACKENDS = {"torch": _gae_torch, "numba": _gae_numba, "cupy": gae_cupy}


def _pick(device: torch.device) -> str:
    if device.type == "cpu" and HAVE_NUMBA:
        return "numba"
    if device.type == "cuda" and have_cupy():
        return "cupy"
    return "torch"  # any device, no numba/cupy


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets (returns) of a right-padded batch.

    Args:
        rewards: ``[B, T]`` token-level rewards (e.g. KL penalty plus the sequence
            score on the last valid token).
        values: ``[B, T]`` critic values ``V(s_t)``.
        mask: ``[B, T]`` response mask, 1s then 0s per row (bool, int or float).
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1].
        backend: ``"auto"``, ``"numba"`` (CPU only), ``"cupy"`` (CUDA only) or ``"torch"``.

    Returns:
        ``(advantages, returns)``, ``[B, T]`` in float32 (float64 if an input is
        float64) on the input device, 0 on padded positions.
    """
    _check_inputs(rewards, values, mask, gamma, lam)
    if backend == "auto":
        backend = _pick(rewards.device)
    if backend not in BACKENDS:
        raise ValueError(
            f"compute_gae: unknown backend {backend!r}, "
            f"expected 'auto' or one of {sorted(BACKENDS)}"
        )
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    valid = mask != 0
    _check_right_padded(valid)
    if rewards.shape[1] == 0:
        empty = torch.zeros(rewards.shape, dtype=dtype, device=rewards.device)
        return empty, empty.clone()
    return BACKENDS[backend](
        rewards.detach().to(dtype), values.detach().to(dtype), valid, gamma, lam
    )
