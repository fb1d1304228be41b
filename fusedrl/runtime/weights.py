"""Weights of sharded models: loading a rank's shard and gathering a full checkpoint.

Loading reads only the rank's shard (safetensors slices, regions from
:mod:`fusedrl.models.sharding`); a GGUF file is quantized per tensor and cannot be
sliced, so it is dequantized whole and cut. A model trained from scratch is
initialised on every worker exactly as the single-device trainer does (the full model
from the seed, then cut), so every layout starts from the same weights.

Weights move between the placements of two calls through the reallocation engine
(:mod:`fusedrl.realloc.weight_sync`), never through a full copy on one device; only a
checkpoint is gathered whole (:func:`gather_full`, on the writing rank, on the model's
device; ``save_hf_checkpoint`` writes CPU copies). Shards are read to the CPU and copied
into the parameters on their device (:func:`load_into`); a from-scratch model is built
on the CPU (the seed gives the same weights on every device) and only its shard moves.
"""

from __future__ import annotations

import functools

from pathlib import Path

import torch
import torch.distributed as dist

from fusedrl.models.build import adapt_state_for_head, build_model
from fusedrl.models.sharding import (EMBED, LM_HEAD, VALUE_HEAD, merge_shards, region_shape,
                                     region_slices, shard_regions, shard_state_dict)


def full_initial_state(config, head: str, seed: int, dtype, singleton_group) -> dict:
    """The full from-scratch weights the single-device trainer builds with ``seed``."""
    model = build_model(config, head, None, seed=seed, tp_group=singleton_group, dtype=dtype)
    return {k: v.clone() for k, v in model.hf_state_dict().items()}


def load_shard(path: str | Path, config, layout, rank: int, head: str) -> dict:
    """This rank's shard of the checkpoint at ``path`` (adapted to ``head``: a value model
    from a language model gets a zero ``score`` head)."""
    path = Path(path)
    if path.is_dir():
        from safetensors import safe_open

        from fusedrl.models.checkpoint import _safetensor_files

        handles = [safe_open(str(f), framework="pt") for f in _safetensor_files(path)]
        where = {k: h for h in handles for k in h.keys()}
        out = {}
        for name, region in shard_regions(config, layout, rank, head).items():
            src = name
            if name == LM_HEAD and name not in where:
                src = EMBED  # tied embeddings are untied on load (docs/design.md)
            if name == VALUE_HEAD and name not in where:
                out[name] = torch.zeros(region_shape(region))
                continue
            if src not in where:
                raise KeyError(f"{path}: checkpoint has no {src!r}")
            out[name] = where[src].get_slice(src)[region_slices(region)].contiguous()
        return out
    from fusedrl.models.checkpoint import load_checkpoint

    _, full = load_checkpoint(path)
    full = adapt_state_for_head(full, config, head)
    return shard_state_dict(full, config, layout, rank, head)


@torch.no_grad()
def load_into(model: torch.nn.Module, shard: dict) -> None:
    own = dict(model.named_parameters())
    missing = [k for k in own if k not in shard]
    if missing:
        raise ValueError(f"shard lacks {len(missing)} parameters, e.g. {missing[0]!r}")
    for name, p in own.items():
        if tuple(shard[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: shard shape {tuple(shard[name].shape)}, "
                             f"model {tuple(p.shape)}")
        p.copy_(shard[name].to(p.dtype))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, shapes: dict) -> dict:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return out


def gather_full(model, groups, head: str) -> dict | None:
    """Merge the shards of dp replica 0 on the placement's rank 0; returns the full state
    there and ``None`` on the other ranks (which only send)."""
    p = groups.placement
    L = p.layout
    root = p.devices[0]
    replica0 = [L.rank(0, t, s) for s in range(L.pp) for t in range(L.tp)]
    # One dtype on the wire: a bf16 model (model.frozen_dtype) keeps float32 norms.
    own = model.hf_state_dict()
    wire = functools.reduce(torch.promote_types, {t.dtype for t in own.values()})
    if groups.rank == 0:
        param = next(model.parameters())
        shards = {0: own}
        for r in replica0[1:]:
            regions = shard_regions(model.config, L, r, head)
            shapes = {n: region_shape(reg) for n, reg in regions.items()}
            # On the model's device: the senders' shards are there (NCCL on GPU).
            flat = torch.empty(sum(torch.Size(s).numel() for s in shapes.values()),
                               dtype=wire, device=param.device)
            dist.recv(flat, p.devices[r])
            # another pp stage's names are not in ``own``: its norms (1-D) are float32
            # (llama.RMSNorm), every other weight is in the model's parameter dtype
            shards[r] = {n: t.to(own[n].dtype if n in own else
                                 torch.float32 if t.dim() == 1 else model.param_dtype)
                         for n, t in _unflat(flat, shapes).items()}
        return merge_shards(shards, model.config, L, head)
    if groups.rank in replica0:
        names = shard_regions(model.config, L, groups.rank, head)
        dist.send(_flat(own[n].to(wire) for n in names).contiguous(), root)
    return None
