"""Helpers shared by the generation-backend tests."""

import torch

from fusedrl.generation import Request
from fusedrl.models.llama import token_logprobs


def random_requests(n, vocab_size, seed=0, lo=1, hi=9):
    """``n`` requests with random prompts of ``lo..hi-1`` tokens (ids >= 3: no specials)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(Request(i, torch.randint(3, vocab_size, (length,), generator=g).tolist()))
    return out


def fresh_logprobs(model, sample, temperature):
    """Log-probs of ``sample``'s response under a fresh forward pass of ``model``."""
    seq = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(seq)
    p = len(sample.prompt_ids)
    return token_logprobs(logits[:, p - 1:-1], seq[:, p:], model.tp_group, temperature)[0]
