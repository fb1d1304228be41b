"""Lean forward of a full (tp=1, one-stage) Llama for the generation engine's hot loop.

The same math as :class:`fusedrl.models.llama.Llama` with a ``KVCache`` (it reads the
model's own parameters), minus what decoding does not need: megatron's autograd
wrappers around every linear layer, separate q/k/v and gate/up matmuls (fused here into
one matmul each over concatenated weights), the per-layer attention mask and key/value
gathers (built once per step and shared by the layers; a contiguous run of slots is a
view of the cache, not a copy), module calls for the norms. Decoding a small model is
dominated by this per-op overhead (gpt-fast's observation), so it pays off most for
small models and batches.

For larger models (SmolLM2-135M: 30 layers, hidden 576, vocab 49152) a decode step is
dominated by float32 GEMMs with few rows (one per running sample) that stream every
weight from memory once per step: the weights (536 MB) do not fit in any cache, and
MKL's GEMM reaches only ~5 GB/s on such cold weights with 16 rows on one thread,
whether the weight is ``[out, in]`` (``F.linear``) or transposed (measured; a plain
sum streams ~14 GB/s on the same core). MKL's packed GEMM (``torch.ops.mkl._mkl_linear``
on a weight reordered by ``_mkl_reorder_linear_weight``, what inductor's CPU freezing
uses) streams them faster: 1.3-1.4x on the layer shapes and 1.4-1.7x on the LM head,
the same float32 dot products (bitwise equal to ``F.linear`` at the packed row count).
A packed weight serves one row count, ``pack_rows`` (the engine's batch size):
batches of at least half of it are zero-padded up to it (rows are independent), other
row counts (prefill, a nearly drained batch) use ``F.linear``. Packing costs memory
(MKL's format is larger than the weight: 1.9 GB for SmolLM2's 0.54 GB), so weights are
packed, LM head first, only up to ``pack_bytes`` in all, and only for float32 weights
on CPU with MKL; repacking after a weight update took ~0.5 s for SmolLM2.

The prepared weights are memory the model does not hold: the fused q/k/v and gate/up
copies (about half the model) and the packed weights (up to ``pack_bytes``).
:meth:`FastForward.planned_bytes` predicts them exactly before anything is prepared
(the MKL size of each distinct weight shape, probed once per process) and
:meth:`FastForward.held_bytes` reports what is held, so that the memory accounting
(:func:`fusedrl.runtime.memory.generation_weight_bytes`) counts them against the
device's total instead of finding them missing later.

The prepared weights are rebuilt when any parameter's version counter changes, so
weights updated in place by training or reallocation (``param.copy_``, optimizer steps)
are picked up by the next step. Parameters must be updated in place, not replaced by
new ``Parameter`` objects (the engine's contract: the model is used in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.models.llama import KVCache, rms_norm, rotate


def supports(model) -> bool:
    """Whether the fast path can run ``model`` (a full language model on one rank)."""
    return (getattr(model, "head", None) == "lm" and model.tp_size == 1
            and model.stage.has_embedding and model.stage.has_head
            and len(model.model.layers) == model.config.num_layers)


def _mkl_packing() -> bool:
    return (torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
            and hasattr(torch.ops.mkl, "_mkl_linear"))


_PACKED_SIZE: dict[tuple[int, int, int], int] = {}


def packed_size(out_features: int, in_features: int, rows: int) -> int:
    """Bytes of a float32 ``[out, in]`` weight in MKL's packed format for ``rows`` rows,
    probed once per shape (the format depends on the shape only); 0 if MKL refuses it."""
    key = (out_features, in_features, rows)
    if key not in _PACKED_SIZE:
        try:
            t = torch.ops.mkl._mkl_reorder_linear_weight(
                torch.zeros(out_features, in_features), rows)
            _PACKED_SIZE[key] = t.numel() * t.element_size()
        except RuntimeError:
            _PACKED_SIZE[key] = 0
    return _PACKED_SIZE[key]


def _opaque(t: torch.Tensor) -> bool:
    try:
        t.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return True
    return False


def _tensors(entry) -> list[torch.Tensor]:
    if isinstance(entry, torch.Tensor):
        return [entry]
    if isinstance(entry, tuple):
        return [t for e in entry for t in _tensors(e)]
    return []


class FastForward:
    """``forward(ids, positions, cache, select)`` -> logits ``[B, V]`` at ``select``."""

    def __init__(self, model, pack_rows: int = 16, pack_bytes: int = 3 << 30):
        if not supports(model):
            raise ValueError("FastForward needs a full lm model at tp=1")
        self.model = model
        self.pack_rows = max(1, int(pack_rows))
        self.pack_bytes = pack_bytes
        self._params = list(model.parameters())
        self._versions: tuple | None = None
        self._layers: list[tuple] = []
        self._head: tuple = ()

    def _can_pack(self) -> bool:
        head = self.model.lm_head.weight
        return head.dtype == torch.float32 and head.device.type == "cpu" and _mkl_packing()

    def _matrices(self) -> list[tuple[int, int]]:
        """``(out, in)`` of every weight the fast path may pack, in packing order (the
        LM head, then per layer q/k/v fused, o, gate/up fused, down)."""
        out = [tuple(self.model.lm_head.weight.shape)]
        for layer in self.model.model.layers.values():
            a, m = layer.self_attn, layer.mlp
            qkv = a.q_proj.weight.shape[0] + a.k_proj.weight.shape[0] + a.v_proj.weight.shape[0]
            hidden = a.q_proj.weight.shape[1]
            out += [(qkv, hidden), tuple(a.o_proj.weight.shape),
                    (m.gate_proj.weight.shape[0] + m.up_proj.weight.shape[0], hidden),
                    tuple(m.down_proj.weight.shape)]
        return out

    def planned_bytes(self) -> int:
        """Bytes the prepared weights take once built (the fused q/k/v and gate/up
        copies, and what the packing budget admits, in :meth:`_weights`'s order)."""
        itemsize = self.model.lm_head.weight.element_size()
        shapes = self._matrices()
        copies = sum(o * i for k, (o, i) in enumerate(shapes) if k % 4 in (1, 3)) * itemsize
        budget, packed = (self.pack_bytes if self._can_pack() else 0), 0
        for o, i in shapes:
            size = packed_size(o, i, self.pack_rows) if budget > 0 else 0
            if not size:
                continue
            if size > budget:
                break
            budget -= size
            packed += size
        return copies + packed

    def held_bytes(self) -> int:
        """Bytes of the prepared weights held now (0 before the first forward)."""
        own = {p.untyped_storage().data_ptr() for p in self._params}
        seen: dict[int, int] = {}
        for entry in [self._head, *self._layers]:
            for t in _tensors(entry):
                if _opaque(t):
                    seen[id(t)] = t.numel() * t.element_size()  # MKL-packed: own memory
                    continue
                st = t.untyped_storage()
                if st.data_ptr() not in own:
                    seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def release(self) -> None:
        """Drop the prepared weights (fused and packed copies); the next forward rebuilds
        them."""
        self._layers, self._head, self._versions = [], (), None

    def _weights(self) -> list[tuple]:
        versions = tuple(p._version for p in self._params)
        if versions != self._versions:
            self._layers, self._head = [], ()  # free the old copies first
            head = self.model.lm_head.weight.detach()
            budget = [self.pack_bytes if self._can_pack() else 0]

            def prepared(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                # (weight [out, in], its MKL-packed form or None), packed within the budget
                w = w.detach()
                if budget[0] > 0:
                    try:
                        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, self.pack_rows)
                    except RuntimeError:
                        return w, None
                    size = packed.numel() * packed.element_size()
                    if size <= budget[0]:
                        budget[0] -= size
                        return w, packed
                    budget[0] = 0
                return w, None

            self._head = prepared(head)
            layers = []
            for layer in self.model.model.layers.values():
                a, m = layer.self_attn, layer.mlp
                n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
                layers.append((n1.weight.detach(), n1.eps, prepared(wqkv),
                               prepared(a.o_proj.weight), n2.weight.detach(), n2.eps,
                               prepared(wgu), prepared(m.down_proj.weight), a.layer_idx))
            self._layers, self._versions = layers, versions
        return self._layers

    def _linear(self, x: torch.Tensor, weight: tuple) -> torch.Tensor:
        """``x @ w.T`` for ``weight = (w, packed)``: packed GEMM when the rows fit the pack."""
        w, packed = weight
        p = self.pack_rows
        rows = x.numel() // x.shape[-1]
        if packed is None or not p // 2 <= rows <= p:
            return F.linear(x, w)
        x2 = x.reshape(rows, x.shape[-1])
        if rows < p:
            x2 = torch.cat([x2, x2.new_zeros(p - rows, x2.shape[1])])
        out = torch.ops.mkl._mkl_linear(x2, packed, w, None, p)
        return out[:rows].view(*x.shape[:-1], w.shape[0])

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 select: torch.Tensor) -> torch.Tensor:
        return self.forward_groups([(ids, positions, cache.slots, select)], cache)

    @torch.inference_mode()
    def forward_groups(self, groups: list[tuple], cache: KVCache) -> torch.Tensor:
        """One forward over the tokens of several groups ``(ids [b, t], positions [b, t],
        slots [b], select [b])`` -> logits ``[sum of b, V]`` (groups' rows in order).

        The linear layers run once on all the groups' tokens (one pass over the weights,
        which is what a decode step costs on CPU); attention runs per group. The engine
        uses it to decode the running samples and prefill the admitted ones together.
        """
        model, cfg = self.model, self.model.config
        weights = self._weights()
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = nh * hd, nkv * hd
        dev = groups[0][0].device
        attn, flat_ids, flat_pos, flat_slots, picks = [], [], [], [], []
        offset = 0
        for ids, positions, slots, select in groups:
            b, t = ids.shape
            # Rows of the cache this group reads: a view when the slots are a contiguous run.
            slot_list = slots.tolist()
            first = slot_list[0]
            contiguous = slot_list == list(range(first, first + b))
            span = int(positions.max()) + 1
            mask = (torch.arange(span, device=dev)[None, None, :]
                    <= positions[:, :, None])[:, None]
            attn.append((b, t, slots, first, contiguous, span, mask))
            flat_ids.append(ids.reshape(-1))
            flat_pos.append(positions.reshape(-1))
            flat_slots.append(slots[:, None].expand(b, t).reshape(-1))
            picks.append(offset + torch.arange(b, device=dev) * t + select)
            offset += b * t
        one = len(groups) == 1
        ids, positions, slots = ((flat_ids[0], flat_pos[0], flat_slots[0]) if one else
                                 (torch.cat(flat_ids), torch.cat(flat_pos), torch.cat(flat_slots)))
        n = ids.shape[0]  # tokens of all groups, one row each
        cos, sin = model.rope_cos[positions][:, None], model.rope_sin[positions][:, None]
        h = F.embedding(ids, model.model.embed_tokens.weight)
        for w1, eps1, wqkv, wo, w2, eps2, wgu, wdown, idx in weights:
            qkv = self._linear(rms_norm(h, w1, eps1), wqkv)
            # RoPE on the q and k heads together: [n, nh + nkv, hd]
            qk = rotate(qkv[:, :q_size + kv_size].view(n, nh + nkv, hd), cos, sin)
            q = qk[:, :nh]
            ck, cv = cache.k[idx], cache.v[idx]
            ck[slots, :, positions] = qk[:, nh:]
            cv[slots, :, positions] = qkv[:, q_size + kv_size:].view(n, nkv, hd)
            outs, start = [], 0
            for b, t, gslots, first, contiguous, span, mask in attn:
                if contiguous:
                    keys, values = ck[first:first + b, :, :span], cv[first:first + b, :, :span]
                else:
                    keys, values = ck[gslots, :, :span], cv[gslots, :, :span]
                qg = q[start:start + b * t].view(b, t, nh, hd).transpose(1, 2)
                out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask,
                                                     enable_gqa=True)
                outs.append(out.transpose(1, 2).reshape(b * t, q_size))
                start += b * t
            h = h + self._linear(outs[0] if one else torch.cat(outs), wo)
            gu = self._linear(rms_norm(h, w2, eps2), wgu)
            gate, up = gu.chunk(2, dim=-1)
            h = h + self._linear(F.silu(gate) * up, wdown)
        h = h[picks[0] if one else torch.cat(picks)]
        return self._linear(rms_norm(h, model.model.norm.weight, model.model.norm.eps),
                            self._head)


__all__ = ["FastForward", "supports"]
