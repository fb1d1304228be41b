"""Build a model (one stage/rank of it) from scratch or from a full checkpoint."""

from __future__ import annotations

import torch

from fusedrl.models.config import ModelConfig
from fusedrl.models.llama import Llama, StageSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``model.dtype`` of a config -> the torch dtype models are built in."""


def adapt_state_for_head(state: dict[str, torch.Tensor], config: ModelConfig,
                         head: str) -> dict[str, torch.Tensor]:
    """Make a full state dict fit a model with ``head``.

    A value model (critic, reward) initialised from a language model drops ``lm_head``
    and starts with a zero ``score`` head, as OpenRLHF/verl critics do.
    """
    state = dict(state)
    if head == "value":
        state.pop("lm_head.weight", None)
        if "score.weight" not in state:
            state["score.weight"] = torch.zeros(1, config.hidden_size)
    else:
        state.pop("score.weight", None)
        if "lm_head.weight" not in state:
            raise ValueError("checkpoint has no lm_head.weight (and no tied embedding) "
                             "for a language-model head")
    return state


def load_full_state(model: Llama, state: dict[str, torch.Tensor], layout=None,
                    rank: int = 0) -> None:
    """Copy this rank's shard of a full HF state dict into ``model``."""
    state = adapt_state_for_head(state, model.config, model.head)
    if layout is not None and layout.world_size > 1:
        from fusedrl.models.sharding import shard_state_dict

        state = shard_state_dict(state, model.config, layout, rank, model.head)
    own = dict(model.named_parameters())
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, param in own.items():
            src = state[name]
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint parameter {name!r} has shape {tuple(src.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))


def resolve_compute_dtype(storage: torch.dtype, device, setting: str = "auto") -> torch.dtype:
    """The dtype a model stored in ``storage`` computes in (``model.frozen_compute_dtype``).

    ``auto``: float32 for bf16 weights on a CPU without bf16 matrix instructions
    (AVX512-BF16/AMX; there a bf16 matmul measured 5.5x slower than float32 on an AMD
    EPYC), else the storage dtype. ``float32``/``bfloat16``: that dtype.
    """
    if setting != "auto":
        return TORCH_DTYPES[setting]
    if (storage == torch.bfloat16 and torch.device(device or "cpu").type == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.float32
    return storage


def build_model(config: ModelConfig, head: str = "lm", state: dict | None = None,
                seed: int = 0, stage: StageSpec | None = None, tp_group=None, layout=None,
                rank: int = 0, dtype: torch.dtype = torch.float32, device=None,
                compute_dtype: torch.dtype | None = None) -> Llama:
    """A model initialised from ``state`` (full HF tensors) or randomly from ``seed``,
    on ``device`` (default CPU), stored in ``dtype`` and computing in ``compute_dtype``
    (default: ``dtype``).

    Random initialisation always runs on the CPU generator (megatron's
    ``use_cpu_initialization``) and the module moves to ``device`` afterwards, so a seed
    gives the same weights on every device; ``state`` is copied in on the device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(config, head=head, stage=stage, tp_group=tp_group, dtype=dtype,
                      device=device, compute_dtype=compute_dtype)
    if state is not None:
        load_full_state(model, state, layout, rank)
    return model
