"""Lean forward of a full (tp=1, one-stage) Llama for the generation engine's hot loop.

The same math as :class:`fusedrl.models.llama.Llama` with a ``KVCache`` (it reads the
model's own parameters), minus what decoding does not need: megatron's autograd
wrappers around every linear layer, separate q/k/v and gate/up matmuls (fused here into
one matmul each over concatenated weights), the per-layer attention mask and key/value
gathers (built once per step and shared by the layers; a contiguous run of slots is a
view of the cache, not a copy). Decoding a small model is dominated by this per-op
overhead (gpt-fast's observation), so it pays off most for small models and batches.

The concatenated weights are rebuilt when any parameter's version counter changes, so
weights updated in place by training or reallocation (``param.copy_``, optimizer steps)
are picked up by the next step. Parameters must be updated in place, not replaced by
new ``Parameter`` objects (the engine's contract: the model is used in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.models.llama import KVCache, apply_rope


def supports(model) -> bool:
    """Whether the fast path can run ``model`` (a full language model on one rank)."""
    return (getattr(model, "head", None) == "lm" and model.tp_size == 1
            and model.stage.has_embedding and model.stage.has_head
            and len(model.model.layers) == model.config.num_layers)


class FastForward:
    """``forward(ids, positions, cache, select)`` -> logits ``[B, V]`` at ``select``."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError("FastForward needs a full lm model at tp=1")
        self.model = model
        self._params = list(model.parameters())
        self._versions: tuple | None = None
        self._layers: list[tuple] = []

    def _weights(self) -> list[tuple]:
        versions = tuple(p._version for p in self._params)
        if versions != self._versions:
            layers = []
            for layer in self.model.model.layers.values():
                a, m = layer.self_attn, layer.mlp
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()
                layers.append((layer.input_layernorm, wqkv, a.o_proj.weight.detach(),
                               layer.post_attention_layernorm, wgu,
                               m.down_proj.weight.detach(), a.layer_idx))
            self._layers, self._versions = layers, versions
        return self._layers

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 select: torch.Tensor) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        b, t = ids.shape
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = nh * hd, nkv * hd
        slots = cache.slots
        # Rows of the cache this batch reads: a view when the slots are a contiguous run.
        slot_list = slots.tolist()
        first = slot_list[0]
        contiguous = slot_list == list(range(first, first + b))
        span = int(positions.max()) + 1
        rows = slots[:, None].expand(b, t)
        mask = (torch.arange(span, device=ids.device)[None, None, :]
                <= positions[:, :, None])[:, None]
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        h = F.embedding(ids, model.model.embed_tokens.weight)
        for norm1, wqkv, wo, norm2, wgu, wdown, idx in self._weights():
            qkv = F.linear(norm1(h), wqkv)
            # RoPE on the q and k heads together: [b, t, nh + nkv, hd] -> [b, nh + nkv, t, hd]
            qk = apply_rope(qkv[..., :q_size + kv_size].view(b, t, nh + nkv, hd).transpose(1, 2),
                            cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[..., q_size + kv_size:].view(b, t, nkv, hd)
            ck, cv = cache.k[idx], cache.v[idx]
            ck[rows, :, positions] = k.transpose(1, 2)
            cv[rows, :, positions] = v
            if contiguous:
                keys, values = ck[first:first + b, :, :span], cv[first:first + b, :, :span]
            else:
                keys, values = ck[slots, :, :span], cv[slots, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=True)
            h = h + F.linear(out.transpose(1, 2).reshape(b, t, q_size), wo)
            gu = F.linear(norm2(h), wgu)
            gate, up = gu.chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, wdown)
        h = h[torch.arange(b, device=h.device), select]
        return F.linear(model.model.norm(h), model.lm_head.weight)


__all__ = ["FastForward", "supports"]
