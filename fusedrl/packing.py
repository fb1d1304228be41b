"""Packed sequences: several samples of a micro-batch concatenated into one row, with
attention kept inside each sample (issue 19; OpenRLHF's ``--packing_samples``, verl's
remove-padding, NeMo-RL's sequence packing).

A micro-batch of right-padded rows computes ``rows x longest row`` tokens; on a
long-tailed batch most of them are padding. :func:`pack` lays the micro-batch's samples
into rows of the longest sample's length by first-fit decreasing (:func:`pack_rows`),
so a row holds one long sample or several short ones. In the model
(:class:`fusedrl.models.llama.Llama`) each token gets its position within its own
sample (RoPE restarts per sample) and attends only to earlier tokens of the same
sample: a block-diagonal causal mask built from per-token segment ids
(:func:`fusedrl.models.llama.segment_mask`). Every sample's outputs are then those of
its own padded row, up to float summation order.

The rest of the code keeps its per-sample ``[B, R]`` tensors: a packed micro-batch is a
:class:`~fusedrl.rollout.RolloutBatch` with ``packed`` set, and the response heads
(:func:`fusedrl.rollout.response_outputs`) read the packed output at each sample's
flat offset (:attr:`Packed.starts`), touching only real response tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def pack_rows(lengths: list[int], cap: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` laid into rows of at most ``cap``
    tokens (a longer sample gets a row of its own). Samples are taken longest first (a
    stable sort: equal lengths keep their order), each into the first row it fits."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, f in enumerate(fill) if f + lengths[i] <= cap), None)
        if r is None:
            rows.append([i])
            fill.append(lengths[i])
        else:
            rows[r].append(i)
            fill[r] += lengths[i]
    return rows


def packed_tokens(lengths: list[int]) -> int:
    """Tokens a packed forward of samples of ``lengths`` computes: rows x the longest
    sample (the row width)."""
    if not lengths:
        return 0
    cap = max(lengths)
    return len(pack_rows(lengths, cap)) * cap


@dataclass
class Packed:
    """The packed rows of one micro-batch: ``ids``, ``positions`` (within each sample)
    and ``segments`` (sample index in the micro-batch; a row's tail padding gets
    ``-1``), all ``[rows, width]``; ``starts`` [B] is the flat offset
    (``row * width + column``) of each sample's first token."""

    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    starts: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """``[rows, width]``: what a pipeline stage's activations are shaped by."""
        return self.ids.shape

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.ids, self.positions, self.segments,
                                               self.starts)))


def pack(mb):
    """``mb`` (a :class:`~fusedrl.rollout.RolloutBatch` micro-batch) with its samples
    packed (``mb.packed`` set). When every row would hold a single sample the padded
    rows are already packed: ``mb`` is returned as it is, and the forward is exactly
    the padded one."""
    lens = (mb.prompt_lens + mb.response_lens).tolist()
    cap = max(lens)
    rows = pack_rows(lens, cap)
    if len(rows) == len(lens):
        return mb
    dev = mb.input_ids.device
    ids = torch.zeros(len(rows), cap, dtype=mb.input_ids.dtype, device=dev)
    pos = torch.zeros(len(rows), cap, dtype=torch.long, device=dev)
    seg = torch.full((len(rows), cap), -1, dtype=torch.long, device=dev)
    starts = torch.zeros(len(lens), dtype=torch.long, device=dev)
    for r, members in enumerate(rows):
        col = 0
        for b in members:
            n = lens[b]
            ids[r, col:col + n] = mb.input_ids[b, :n]
            pos[r, col:col + n] = torch.arange(n, device=dev)
            seg[r, col:col + n] = b
            starts[b] = r * cap + col
            col += n
    return dataclasses.replace(mb, packed=Packed(ids, pos, seg, starts))


def select(batch, idx: torch.Tensor, packed: bool):
    """Micro-batch ``idx`` of ``batch``: its rows (:meth:`RolloutBatch.select`), packed
    when ``packed`` (:func:`pack`)."""
    mb = batch.select(idx)
    return pack(mb) if packed else mb


def model_input(mb):
    """What a pipeline carries for micro-batch ``mb``: its packed rows or its token ids."""
    return mb.packed if mb.packed is not None else mb.input_ids


def token_ids(inp) -> torch.Tensor:
    """The first stage's input of a :func:`model_input`."""
    return inp.ids if isinstance(inp, Packed) else inp


def forward_kwargs(inp) -> dict:
    """Keyword arguments of every stage's forward for a :func:`model_input`: positions
    and segment ids of packed rows, nothing for padded ones."""
    if isinstance(inp, Packed):
        return {"positions": inp.positions, "segments": inp.segments}
    return {}


def forward(model, mb) -> torch.Tensor:
    """A whole model's output on micro-batch ``mb`` (packed or not)."""
    inp = model_input(mb)
    return model(token_ids(inp), **forward_kwargs(inp))
