"""The sharding of a Llama-family model over a (dp, tp, pp) layout.

This is the one place that knows which part of which parameter a rank holds (the
"Sharding convention" of docs/design.md); the model definition stays free of parallel
code, and the checkpoint loader, the runtime and the reallocation planner all ask
this module. Everything is expressed as *regions*: a tuple of ``(start, stop)`` per
dimension in the coordinates of the full, unsharded parameter, so a shard is
``full[region_slices(region)]``.

Convention (Megatron-style tensor parallelism, Hugging Face names with global
layer indices):

- column-parallel, split on dim 0: ``q_proj``, ``gate_proj``, ``up_proj``,
  ``model.embed_tokens.weight`` and ``lm_head.weight`` (vocab-parallel);
- row-parallel, split on dim 1: ``o_proj``, ``down_proj``;
- replicated: the RMSNorm weights and the value head ``score.weight``;
- ``k_proj``/``v_proj``: if ``num_kv_heads >= tp`` rank ``r`` holds kv heads
  ``[r*k, (r+1)*k)`` with ``k = num_kv_heads // tp``; otherwise ``tp`` is a multiple
  of ``num_kv_heads`` and rank ``r`` holds the single head ``r // (tp // num_kv_heads)``
  (the head its query heads attend with), replicated over ``tp // num_kv_heads`` ranks;
- pipeline: contiguous layer chunks whose sizes differ by at most one, earlier
  stages taking the extra layer (``numpy.array_split``); the embedding lives on the
  first stage, ``model.norm`` and the head (``lm_head``/``score``) on the last.

Data-parallel replicas hold identical shards. Within one layout the regions of a
parameter are therefore either identical or disjoint, and together they tile it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fusedrl.layout import ParallelLayout
from fusedrl.models.config import ModelConfig

Region = tuple[tuple[int, int], ...]
"""``(start, stop)`` per dimension, in full-parameter coordinates."""

Head = Literal["lm", "value"]

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
VALUE_HEAD = "score.weight"

# How a parameter is split across tensor-parallel ranks.
COLUMN = "column"  # dim 0 split evenly
ROW = "row"  # dim 1 split evenly
KV = "kv"  # dim 0 split by kv head, replicated when tp > num_kv_heads
REPLICATED = "replicated"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer parameters, in Hugging Face state-dict order, with their tp split.
_LAYER_PARAMS: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", REPLICATED),
    ("self_attn.q_proj.weight", COLUMN),
    ("self_attn.k_proj.weight", KV),
    ("self_attn.v_proj.weight", KV),
    ("self_attn.o_proj.weight", ROW),
    ("post_attention_layernorm.weight", REPLICATED),
    ("mlp.gate_proj.weight", COLUMN),
    ("mlp.up_proj.weight", COLUMN),
    ("mlp.down_proj.weight", ROW),
)
_LAYER_KIND = dict(_LAYER_PARAMS)
_TOP_KIND = {EMBED: COLUMN, FINAL_NORM: REPLICATED, LM_HEAD: COLUMN, VALUE_HEAD: REPLICATED}


def _check_head(head: str) -> None:
    if head not in ("lm", "value"):
        raise ValueError(f"head must be 'lm' or 'value', got {head!r}")


def head_name(head: Head) -> str:
    """Name of the output head parameter: ``lm_head.weight`` or ``score.weight``."""
    _check_head(head)
    return LM_HEAD if head == "lm" else VALUE_HEAD


def param_shapes(config: ModelConfig, head: Head = "lm") -> dict[str, tuple[int, ...]]:
    """Full shape of every parameter, in Hugging Face state-dict order.

    ``head="lm"`` ends with ``lm_head.weight`` ``[vocab, hidden]`` (always present:
    tied embeddings are untied on load); ``head="value"`` with ``score.weight``
    ``[1, hidden]``.
    """
    _check_head(head)
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    layer_shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, h)}
    for layer in range(config.num_layers):
        for suffix, _ in _LAYER_PARAMS:
            shapes[f"model.layers.{layer}.{suffix}"] = layer_shapes[suffix]
    shapes[FINAL_NORM] = (h,)
    shapes[head_name(head)] = (config.vocab_size, h) if head == "lm" else (1, h)
    return shapes


def param_layer(name: str) -> int | None:
    """Global decoder-layer index of ``name``, or ``None`` for a non-layer parameter."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def param_kind(name: str) -> str:
    """How ``name`` is split over tp: ``"column"``, ``"row"``, ``"kv"`` or ``"replicated"``."""
    m = _LAYER_RE.match(name)
    kind = _LAYER_KIND.get(m.group(2)) if m else _TOP_KIND.get(name)
    if kind is None:
        raise ValueError(f"{name!r} is not a parameter of the Llama sharding convention")
    return kind


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Global layer indices of each pipeline stage.

    Contiguous chunks in the ``numpy.array_split`` convention: sizes differ by at
    most one and the earlier stages take the extra layers.
    """
    if pp < 1:
        raise ValueError(f"pp={pp} must be a positive integer")
    if pp > num_layers:
        raise ValueError(f"pp={pp} is larger than num_layers={num_layers}")
    base, extra = divmod(num_layers, pp)
    stages, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        stages.append(range(start, start + size))
        start += size
    return stages


def param_stage(name: str, config: ModelConfig, pp: int) -> int:
    """Pipeline stage that holds ``name``: the embedding on the first, the final
    norm and the head on the last, a layer parameter on its layer's stage."""
    if not 1 <= pp <= config.num_layers:
        raise ValueError(f"pp={pp} must be between 1 and num_layers={config.num_layers}")
    layer = param_layer(name)
    if layer is None:
        if name == EMBED:
            return 0
        if name in (FINAL_NORM, LM_HEAD, VALUE_HEAD):
            return pp - 1
        raise ValueError(f"{name!r} is not a parameter of the Llama sharding convention")
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"{name!r}: layer {layer} outside a model of {config.num_layers} layers")
    base, extra = divmod(config.num_layers, pp)
    # The first `extra` stages hold base+1 layers each, the rest base layers.
    cut = extra * (base + 1)
    return layer // (base + 1) if layer < cut else extra + (layer - cut) // base


def kv_heads_of_rank(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """The kv heads tp rank ``tp_rank`` holds (a single one when ``tp > num_kv_heads``)."""
    if num_kv_heads >= tp:
        k = num_kv_heads // tp
        return range(tp_rank * k, (tp_rank + 1) * k)
    head = tp_rank // (tp // num_kv_heads)
    return range(head, head + 1)


def tp_region(
    name: str, shape: tuple[int, ...], config: ModelConfig, tp: int, tp_rank: int
) -> Region:
    """Region of ``name`` (full shape ``shape``) held by tensor-parallel rank ``tp_rank``."""
    full = tuple((0, n) for n in shape)
    kind = param_kind(name)
    if kind == REPLICATED or tp == 1:
        return full
    if kind == KV:
        heads = kv_heads_of_rank(config.num_kv_heads, tp, tp_rank)
        d = config.head_dim
        return ((heads.start * d, heads.stop * d),) + full[1:]
    dim = 0 if kind == COLUMN else 1
    size = shape[dim] // tp
    region = list(full)
    region[dim] = (tp_rank * size, (tp_rank + 1) * size)
    return tuple(region)


def shard_regions(
    config: ModelConfig, layout: ParallelLayout, rank: int, head: Head = "lm"
) -> dict[str, Region]:
    """Every parameter ``rank`` of ``layout`` holds, mapped to its region.

    Parameters on other pipeline stages are absent. Raises ``ValueError`` naming
    the offending number when ``layout`` cannot shard ``config``.
    """
    layout.check_model(config)
    coord = layout.coord(rank)
    regions: dict[str, Region] = {}
    for name, shape in param_shapes(config, head).items():
        if param_stage(name, config, layout.pp) != coord.pp:
            continue
        regions[name] = tp_region(name, shape, config, layout.tp, coord.tp)
    return regions


def region_slices(region: Region) -> tuple[slice, ...]:
    """``region`` as a tuple of slices (index a full tensor, or a safetensors slice)."""
    return tuple(slice(a, b) for a, b in region)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(b - a for a, b in region)


def region_numel(region: Region) -> int:
    n = 1
    for a, b in region:
        n *= max(0, b - a)
    return n


def intersect(a: Region, b: Region) -> Region | None:
    """Intersection of two regions of the same parameter, ``None`` when empty."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def contains(outer: Region, inner: Region) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner, strict=True))


def local_slices(region: Region, shard_region: Region) -> tuple[slice, ...]:
    """Slices that select ``region`` (full coordinates) inside a shard holding ``shard_region``."""
    if not contains(shard_region, region):
        raise ValueError(f"region {region} is not inside shard region {shard_region}")
    return tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(region, shard_region))


def shard_tensor(full: Any, region: Region) -> Any:
    """The part of a full parameter (torch tensor or numpy array) inside ``region``.

    Returns a view; call ``.contiguous()`` / ``numpy.ascontiguousarray`` to own it.
    """
    if len(full.shape) != len(region):
        raise ValueError(f"region {region} has {len(region)} dims, tensor has shape "
                         f"{tuple(full.shape)}")
    if any(b > n or a < 0 for (a, b), n in zip(region, full.shape)):
        raise ValueError(f"region {region} outside tensor of shape {tuple(full.shape)}")
    return full[region_slices(region)]


def _contiguous(t: Any) -> Any:
    if hasattr(t, "contiguous"):  # torch
        return t.contiguous()
    import numpy as np

    return np.ascontiguousarray(t)


def shard_state_dict(
    full_state_dict: Mapping[str, Any],
    config: ModelConfig,
    layout: ParallelLayout,
    rank: int,
    head: Head = "lm",
    contiguous: bool = True,
) -> dict[str, Any]:
    """The shard of ``rank`` cut from a full (Hugging Face) state dict.

    A tied checkpoint without ``lm_head.weight`` (``config.tie_word_embeddings``)
    gets its head from ``model.embed_tokens.weight`` (untied on load).
    """
    shapes = param_shapes(config, head)
    out: dict[str, Any] = {}
    for name, region in shard_regions(config, layout, rank, head).items():
        tensor = full_state_dict.get(name)
        if tensor is None and name == LM_HEAD and config.tie_word_embeddings:
            tensor = full_state_dict.get(EMBED)
        if tensor is None:
            raise KeyError(f"state dict has no {name!r} (needed by rank {rank} of {layout})")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"{name}: state dict shape {tuple(tensor.shape)} != model shape {shapes[name]}"
            )
        piece = shard_tensor(tensor, region)
        out[name] = _contiguous(piece) if contiguous else piece
    return out


def merge_shards(
    shards: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    config: ModelConfig,
    layout: ParallelLayout,
    head: Head = "lm",
) -> dict[str, Any]:
    """Rebuild the full parameters from the shards of ranks of ``layout``.

    ``shards`` maps rank -> {name: shard} (a sequence is indexed by rank). Any set
    of ranks that together cover every parameter suffices (e.g. dp replica 0);
    replicas are written once. Works for torch tensors and numpy arrays; the result
    is in Hugging Face state-dict order with the dtype of the first shard seen.
    Raises ``ValueError`` when a shard has the wrong shape or a parameter is not
    fully covered.
    """
    items = shards.items() if isinstance(shards, Mapping) else enumerate(shards)
    shapes = param_shapes(config, head)
    full: dict[str, Any] = {}
    seen: dict[str, set[Region]] = {name: set() for name in shapes}
    for rank, shard in items:
        regions = shard_regions(config, layout, rank, head)
        for name, tensor in shard.items():
            if name not in regions:
                raise ValueError(f"rank {rank} of {layout} does not hold {name!r}")
            region = regions[name]
            if tuple(tensor.shape) != region_shape(region):
                raise ValueError(f"{name} from rank {rank}: shape {tuple(tensor.shape)}, "
                                 f"expected {region_shape(region)}")
            if region in seen[name]:
                continue  # a replica of a shard already written
            if name not in full:
                full[name] = _new_like(tensor, shapes[name])
            full[name][region_slices(region)] = tensor
            seen[name].add(region)
    for name, shape in shapes.items():
        # Regions of one layout are identical or disjoint, so distinct volumes add up.
        covered = sum(region_numel(r) for r in seen[name])
        total = region_numel(tuple((0, n) for n in shape))
        if covered != total:
            raise ValueError(f"shards cover {covered} of {total} elements of {name!r}")
    return {name: full[name] for name in shapes}


def _new_like(tensor: Any, shape: tuple[int, ...]) -> Any:
    if hasattr(tensor, "new_empty"):  # torch
        return tensor.new_empty(shape)
    import numpy as np

    return np.empty(shape, dtype=tensor.dtype)
