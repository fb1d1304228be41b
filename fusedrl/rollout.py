"""Rollout batches: generated samples as right-padded tensors, and the per-token model
outputs (log-probs, values) aligned to response tokens.

A batch is built on CPU (:meth:`RolloutBatch.from_samples`) and may move to a device
(:meth:`RolloutBatch.to`); every tensor it derives is created on its own device."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fusedrl.generation.engine import Sample
from fusedrl.models.llama import token_logprobs


@dataclass
class RolloutBatch:
    """``input_ids`` is prompt + response per row, right-padded; response token ``j`` of
    row ``b`` sits at ``prompt_lens[b] + j`` and is predicted by position
    ``prompt_lens[b] + j - 1``."""

    input_ids: torch.Tensor  # [B, L]
    prompt_lens: torch.Tensor  # [B]
    response_lens: torch.Tensor  # [B]
    response_mask: torch.Tensor  # [B, R] float
    gen_logprobs: torch.Tensor  # [B, R] log-probs reported by the generation engine
    sample_ids: torch.Tensor  # [B]
    packed: object = None
    """A micro-batch whose samples run packed (:func:`fusedrl.packing.pack`): its
    :class:`~fusedrl.packing.Packed` rows, which a model's output is then shaped by."""

    @classmethod
    def from_samples(cls, samples: list[Sample], pad_id: int) -> "RolloutBatch":
        plens = torch.tensor([len(s.prompt_ids) for s in samples])
        rlens = torch.tensor([len(s.response_ids) for s in samples])
        width = int((plens + rlens).max())
        rmax = int(rlens.max())
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(samples), rmax)
        gen_lp = torch.zeros(len(samples), rmax)
        for b, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(s.response_ids)] = 1.0
            gen_lp[b, :len(s.logprobs)] = torch.tensor(s.logprobs)
        return cls(ids, plens, rlens, mask, gen_lp,
                   torch.tensor([s.sample_id for s in samples]))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        """Rows ``index``, with padding trimmed to the longest selected row."""
        plens, rlens = self.prompt_lens[index], self.response_lens[index]
        width, rmax = int((plens + rlens).max()), int(rlens.max())
        return RolloutBatch(self.input_ids[index, :width], plens, rlens,
                            self.response_mask[index, :rmax], self.gen_logprobs[index, :rmax],
                            self.sample_ids[index])

    def predictor_index(self) -> torch.Tensor:
        """[B, R] position whose output predicts (or values the state before) each
        response token; padded entries point at position 0 and are masked."""
        j = torch.arange(self.response_mask.shape[1], device=self.prompt_lens.device)
        idx = self.prompt_lens[:, None] - 1 + j[None, :]
        return torch.where(self.response_mask > 0, idx, torch.zeros_like(idx))

    def response_ids(self) -> torch.Tensor:
        """[B, R] the response tokens (pad where masked)."""
        idx = (self.predictor_index() + 1).clamp(max=self.input_ids.shape[1] - 1)
        return self.input_ids.gather(1, idx)

    def num_tokens(self) -> int:
        return int((self.prompt_lens + self.response_lens).sum())

    def to(self, device) -> "RolloutBatch":
        """The batch on ``device`` (the trainer's): built on CPU from the engine's token
        lists, its tensors then meet the models' outputs there."""
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device)
                               for f in fields(self) if getattr(self, f.name) is not None})


def response_outputs(out: torch.Tensor, batch: RolloutBatch):
    """A model's output (``[B, L, ...]``, or ``[rows, width, ...]`` of a packed batch)
    at the positions predicting each response token, and the function that spreads
    per-token results back to ``[B, R]``: right-padded rows give ``[B, R, ...]``
    (padded entries at position 0, to be masked); packed rows give ``[N, ...]``, the
    N real response tokens only (padded ``[B, R, V]`` logits are never built), and
    their spread puts zeros at padded entries. Differentiable."""
    if batch.packed is None:
        idx = batch.predictor_index().to(out.device)
        if out.dim() == 3:
            idx = idx[..., None].expand(-1, -1, out.shape[-1])
        return out.gather(1, idx), lambda x: x
    mask = (batch.response_mask > 0).to(out.device)
    flat = (batch.packed.starts[:, None] + batch.predictor_index()).to(out.device)[mask]

    def spread(x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(mask.shape + x.shape[1:])
        full[mask] = x
        return full

    return out.flatten(0, 1)[flat], spread


def response_logprobs_from(logits: torch.Tensor, batch: RolloutBatch, tp_group=None,
                           temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of the response tokens from a model's output ``logits``
    ([B, L, V/tp] or packed rows, differentiable)."""
    picked, spread = response_outputs(logits, batch)
    targets = batch.response_ids().to(logits.device)
    if batch.packed is not None:
        targets = targets[batch.response_mask.to(logits.device) > 0]
    return spread(token_logprobs(picked, targets, tp_group, temperature)) * \
        batch.response_mask.to(logits.device)


def response_values_from(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """[B, R] value of the state before each response token from a value head's output
    ([B, L] or packed rows, differentiable)."""
    picked, spread = response_outputs(values, batch)
    return spread(picked) * batch.response_mask.to(values.device)


def sequence_scores_from(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """[B] reward-model score: the value head at the last token of each sequence."""
    last = (batch.prompt_lens + batch.response_lens - 1).to(values.device)
    if batch.packed is not None:
        return values.flatten()[batch.packed.starts.to(values.device) + last]
    return values.gather(1, last[:, None]).squeeze(1)


def response_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under ``model`` (differentiable)."""
    return response_logprobs_from(model(batch.input_ids), batch, model.tp_group, temperature)


def response_values(model, batch: RolloutBatch) -> torch.Tensor:
    """[B, R] value of the state before each response token (differentiable)."""
    return response_values_from(model(batch.input_ids), batch)


def sequence_scores(model, batch: RolloutBatch) -> torch.Tensor:
    """[B] reward-model score: the value head at the last token of each sequence."""
    return sequence_scores_from(model(batch.input_ids), batch)


CALL_KINDS = ("logp", "values", "score")


def infer_head(kind: str, out: torch.Tensor, mb: RolloutBatch, tp_group, width: int,
               temperature: float) -> torch.Tensor:
    """What an inference call returns from a model's output on micro-batch ``mb``:
    ``logp`` / ``values`` padded to ``width`` response tokens (float32), or ``score``
    ([B])."""
    if kind == "score":
        return sequence_scores_from(out, mb).float()
    if kind == "logp":
        x = response_logprobs_from(out, mb, tp_group, temperature)
    elif kind == "values":
        x = response_values_from(out, mb)
    else:
        raise ValueError(f"inference kind must be one of {CALL_KINDS}, got {kind!r}")
    return torch.nn.functional.pad(x.float(), (0, width - x.shape[1]))
