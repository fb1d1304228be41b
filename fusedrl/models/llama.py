"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) with Hugging Face parameter names.

The network is written once, for one pipeline stage and one tensor-parallel rank:
its linear layers are megatron-core's tensor-parallel layers, built with an explicit
``tp_group`` and the *global* sizes (megatron divides them by the group size). Which
layers a stage holds and which slice of each weight a rank holds is decided by
``fusedrl.models.sharding``; this file contains no placement logic.

Parameter names follow ``transformers``' ``LlamaForCausalLM`` with global layer
indices (``model.layers.{i}.self_attn.q_proj.weight``), and ``score.weight`` for the
value head of critic and reward models.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fusedrl.models.config import ModelConfig

with warnings.catch_warnings():
    # megatron-core warns at import that Transformer Engine/Apex are absent: expected on CPU.
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig, tensor_parallel

HEADS = ("lm", "value")


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage holds: a contiguous range of layers, and the ends."""

    layers: range
    has_embedding: bool = True
    has_head: bool = True

    @classmethod
    def full(cls, config: ModelConfig) -> "StageSpec":
        return cls(range(config.num_layers), True, True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 as in transformers' LlamaRMSNorm.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    # the weight (kept in float32) cast to the activations' dtype, as a bf16 HF model
    return weight.to(dtype) * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_position, head_dim] (Su et al. 2021, HF's rotate_half layout)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    t = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (GPT-NeoX halves) with ``cos``/``sin`` already broadcastable to ``x``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D] gathered at each token's position."""
    return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))


class KVCache:
    """Slot-based key/value cache for continuous batching.

    ``k[layer]``/``v[layer]`` are [slots, local_kv_heads, max_len, head_dim]. A forward
    pass with a cache attached writes the keys/values of its tokens at
    ``(slots[b], positions[b, t])`` and attends, for each query, to the keys of its
    slot at positions ``<=`` its own. Entries past a slot's length may hold stale data;
    they are never read because every read is masked by position.
    """

    def __init__(self, layers: range, num_slots: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device=None):
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.slots: torch.Tensor | None = None  # [B] slot of each batch row, set per call

    def bind(self, slots: torch.Tensor) -> "KVCache":
        self.slots = slots
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp_group, mp_config):
        super().__init__()
        tp = tp_group.size()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // tp
        # GQA with fewer kv heads than tp ranks: every rank holds one (replicated) kv head.
        self.num_kv_heads = max(1, config.num_kv_heads // tp)
        init = _init_method(config)
        kv_out = self.num_kv_heads * tp * config.head_dim  # megatron divides by tp
        col = dict(config=mp_config, init_method=init, bias=False, gather_output=False,
                   tp_group=tp_group)
        self.q_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, config.q_size, **col)
        self.k_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, kv_out, **col)
        self.v_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, kv_out, **col)
        self.o_proj = tensor_parallel.RowParallelLinear(
            config.q_size, config.hidden_size, config=mp_config, init_method=init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x, cos, sin, positions, cache: KVCache | None, mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x)[0].view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x)[0].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x)[0].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None and mask is not None:  # packed rows: within each sample only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            slots = cache.slots
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            rows = slots[:, None].expand(b, t)
            # index_put over (slot, position): [b, t, kvh, d] into [slots, kvh, L, d]
            ck[rows, :, positions] = k.transpose(1, 2)
            cv[rows, :, positions] = v.transpose(1, 2)
            span = int(positions.max()) + 1
            keys, values = ck[slots, :, :span], cv[slots, :, :span]
            mask = torch.arange(span, device=x.device)[None, None, :] <= positions[:, :, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                                 enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)[0]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp_group, mp_config):
        super().__init__()
        init = _init_method(config)
        col = dict(config=mp_config, init_method=init, bias=False, gather_output=False,
                   tp_group=tp_group)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = tensor_parallel.ColumnParallelLinear(h, i, **col)
        self.up_proj = tensor_parallel.ColumnParallelLinear(h, i, **col)
        self.down_proj = tensor_parallel.RowParallelLinear(
            i, h, config=mp_config, init_method=init, bias=False, input_is_parallel=True,
            skip_bias_add=False, tp_group=tp_group)

    def forward(self, x):
        # SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp_group, mp_config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, tp_group, mp_config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp_group, mp_config)

    def forward(self, x, cos, sin, positions, cache, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` of a Hugging Face Llama: embedding, layers of this stage, final norm."""

    def __init__(self, config: ModelConfig, stage: StageSpec, tp_group, mp_config):
        super().__init__()
        if stage.has_embedding:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, init_method=_init_method(config),
                config=mp_config, tp_group=tp_group)
        # Keys are global layer indices so that state_dict names are the checkpoint's.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, i, tp_group, mp_config) for i in stage.layers})
        if stage.has_head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """One stage/rank of a Llama with an LM head (actor, reference) or a value head.

    ``forward(input_ids | hidden, positions=None, cache=None, select=None)`` returns, on the last
    stage, vocab-parallel logits [B, T, V/tp] (``head="lm"``) or values [B, T]
    (``head="value"``), otherwise the hidden states for the next stage.

    ``gradient_checkpointing``: in a training forward (``self.training``, autograd on, no
    KV cache) each decoder layer keeps only its input and recomputes its activations in
    the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost", §3): activation memory per layer drops from all intermediates (attention
    scores, the MLP's 2 x intermediate_size) to one ``[B, T, hidden]`` tensor, for about
    one more forward. Gradients are the same; inference is unaffected.
    """

    def __init__(self, config: ModelConfig, head: str = "lm", stage: StageSpec | None = None,
                 tp_group=None, dtype: torch.dtype = torch.float32, device=None,
                 gradient_checkpointing: bool = False,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        from fusedrl.runtime.dist import local_group

        self.config = config
        self.head = head
        # Parameters are stored in ``dtype`` (norm weights in float32). ``compute_dtype``
        # (default: ``dtype``) is what matmuls run in: a bf16 model on a CPU without bf16
        # matrix units computes ~5x faster from float32 copies made one module at a time.
        self.param_dtype = dtype
        # The dtype of the hidden states between layers and stages: a bf16 model keeps its
        # norm weights in float32, so a stage's first parameter does not tell it.
        self.activation_dtype = compute_dtype or dtype
        self._upcast = self.activation_dtype if self.activation_dtype != dtype else None
        self.stage = stage or StageSpec.full(config)
        self.tp_group = tp_group if tp_group is not None else local_group()
        mp_config = ModelParallelConfig(use_cpu_initialization=True, params_dtype=dtype,
                                        perform_initialization=True)
        self.model = Backbone(config, self.stage, self.tp_group, mp_config)
        if self.stage.has_head:
            if head == "lm":
                self.lm_head = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, config.vocab_size, config=mp_config,
                    init_method=_init_method(config), bias=False, gather_output=False,
                    tp_group=self.tp_group)
            else:
                # The value head is tiny and replicated on every tp rank.
                self.score = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype)
                nn.init.zeros_(self.score.weight)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if device is not None:
            self.to(device)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their Hugging Face names (no megatron extra state)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    @property
    def tp_size(self) -> int:
        return self.tp_group.size()

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        attn = next(iter(self.model.layers.values())).self_attn if len(self.model.layers) else None
        kv_heads = attn.num_kv_heads if attn else 1
        p = next(self.parameters())
        return KVCache(self.stage.layers, num_slots, kv_heads, max_len, self.config.head_dim,
                       self.activation_dtype, p.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, select: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """``select`` [B]: on the last stage, apply the head only at this token of each
        row (the last prompt token during prefill), returning [B, V/tp] or [B].
        ``segments`` [B, T]: packed rows (:mod:`fusedrl.packing`), the sample each token
        belongs to; a token attends only to earlier tokens of its own sample
        (:func:`segment_mask`), and ``positions`` restart per sample."""
        call = self._call
        if self.stage.has_embedding:
            b, t = x.shape
            h = call(self.model.embed_tokens, x)
        else:
            b, t = x.shape[:2]
            h = x
        if positions is None:
            positions = torch.arange(t, device=h.device).expand(b, t)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = segment_mask(segments) if segments is not None and cache is None else None
        recompute = (self.gradient_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for layer in self.model.layers.values():
            if recompute:
                # Non-reentrant: works when only the parameters need gradients (first
                # stage: input ids), and replays tensor-parallel collectives in order.
                h = torch.utils.checkpoint.checkpoint(call, layer, h, cos, sin, positions,
                                                      None, mask, use_reentrant=False)
            else:
                h = call(layer, h, cos, sin, positions, cache, mask)
        if not self.stage.has_head:
            return h
        if select is not None:
            h = h[torch.arange(b, device=h.device), select].unsqueeze(1)
        h = call(self.model.norm, h)
        if select is not None:
            h = h.squeeze(1)
        if self.head == "lm":
            return call(self.lm_head, h)[0]
        return call(self.score, h).squeeze(-1)

    def _call(self, module: nn.Module, *args):
        """``module(*args)``, on ``compute_dtype`` copies of its parameters when they are
        stored in another dtype (only one module's copies exist at a time)."""
        if self._upcast is None:
            return module(*args)
        params = {n: p.to(self._upcast) for n, p in module.named_parameters()}
        return torch.func.functional_call(module, params, args)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean attention mask of packed rows: query ``i`` sees key ``j``
    when ``j <= i`` and both are tokens of the same sample (a block-diagonal causal
    mask; a row's tail padding forms its own block, so no query sees nothing)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def _init_method(config: ModelConfig):
    # GPT-2/Llama style N(0, 0.02) init for training from scratch; checkpoints overwrite it.
    std = 0.02

    def init(t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)

    return init


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; backward keeps this rank's slice (megatron's
    ``_GatherFromModelParallelRegion``, whose implementation allocates on CUDA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        size = grad.shape[-1] // ctx.group.size()
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * size:(rank + 1) * size].contiguous(), None


def gather_logits(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Full-vocab logits from vocab-parallel ones (identity at tp=1), differentiable."""
    if tp_group.size() == 1:
        return logits
    return _GatherLastDim.apply(logits, tp_group)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, tp_group,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(targets) under softmax(logits / temperature); logits may be vocab-parallel."""
    full = gather_logits(logits, tp_group).float()
    if temperature != 1.0:
        full = full / temperature
    return torch.log_softmax(full, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Llama", "StageSpec", "KVCache", "RMSNorm", "gather_logits", "token_logprobs",
           "num_parameters", "rope_tables", "apply_rope", "segment_mask"]
