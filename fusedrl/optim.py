"""The optimizer of the trained models: AdamW, with its moments optionally in bfloat16.

``ppo.optimizer_state_dtype: float32`` is ``torch.optim.AdamW`` itself. ``bfloat16``
keeps both Adam moments in bf16 (half of AdamW's 8 bytes of state per parameter): each
step computes in float32 from them and stores the new moments with stochastic rounding
(Zamirai et al. 2020, "Revisiting BFloat16 Training", §3: round-to-nearest would drop
the second moment's updates, 1 - beta2 = 1e-3 being below bf16's relative precision of
2^-8, and it would stop decaying; rounding up with probability equal to the remainder
keeps every moment unbiased). The noise comes from a generator seeded by (step,
parameter), so a resumed run draws the same noise as the uninterrupted one without extra
state in the checkpoint.
"""

from __future__ import annotations

import math

import torch

from fusedrl.config import OPTIMIZER_STATE_DTYPES

# Elements per chunk of the float32 step: bounds its temporaries (moments, denominator)
# to a few x 16 MiB however large a parameter (the 49152 x 576 embedding: 113 MB).
_CHUNK = 1 << 22


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float32) as bfloat16, rounded up in magnitude with probability equal to the
    dropped fraction: add uniform 16-bit noise below bf16's last mantissa bit, then
    truncate (the sum carries into the exponent where it must)."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) with moments stored in bfloat16 and
    stochastically rounded; the update itself is computed in float32, as
    ``torch.optim.AdamW`` computes it.

    Lifecycle: as any ``torch.optim.Optimizer`` (``zero_grad``, ``step``,
    ``state_dict``/``load_state_dict``; moments are created on the first step).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self._generator = torch.Generator()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                     group["weight_decay"])
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = int(state["step"].item())
                # counter-based noise: the same on a resumed run (see the module docstring)
                gen = self._generator
                if gen.device != p.device:
                    gen = self._generator = torch.Generator(p.device)
                gen.manual_seed((self.seed * 1_000_003 + t) * 1_000_003 + index)
                bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
                if wd:
                    p.mul_(1 - lr * wd)
                flat_p, flat_g = p.view(-1), p.grad.view(-1)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for lo in range(0, flat_p.numel(), _CHUNK):
                    hi = lo + _CHUNK
                    g = flat_g[lo:hi].float()
                    m = m_all[lo:hi].float().lerp_(g, 1 - b1)
                    v = v_all[lo:hi].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                    update = (m / denom).mul_(-lr / bias1)
                    flat_p[lo:hi].add_(update.to(p.dtype))
                    m_all[lo:hi] = stochastic_round_to_bf16(m, gen)
                    v_all[lo:hi] = stochastic_round_to_bf16(v, gen)
        return loss


def build_optimizer(params, lr: float, weight_decay: float, state_dtype: str = "float32",
                    seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer of one trained model (``ppo.optimizer_state_dtype``)."""
    if state_dtype == "float32":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if state_dtype == "bfloat16":
        return AdamW(params, lr=lr, weight_decay=weight_decay, seed=seed)
    raise ValueError(f"optimizer state dtype must be one of "
                     f"{', '.join(OPTIMIZER_STATE_DTYPES)}, got {state_dtype!r}")
