"""Gradient checkpointing of the Llama decoder layers: the same gradients as without it,
fewer tensors kept for the backward pass, and no recomputation outside training."""

import pytest
import torch

from fusedrl.models import ModelConfig
from fusedrl.models.build import build_model
from fusedrl.models.llama import StageSpec, token_logprobs

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128, rope_theta=500.0)


def _loss(model, ids):
    out = model(ids)
    if model.head == "lm":
        return -token_logprobs(out[:, :-1], ids[:, 1:], model.tp_group).mean()
    return out.square().mean()


def _grads(model, ids, checkpointing):
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("head", ["lm", "value"])
def test_checkpointed_gradients_equal_plain_ones(head):
    model = build_model(CFG, head, seed=1).train()
    if head == "value":  # a zero value head would give zero gradients below it
        torch.nn.init.normal_(model.score.weight, std=0.5)
    ids = torch.randint(0, CFG.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    loss_ref, ref, saved_ref = _grads(model, ids, False)
    loss_ck, ck, saved_ck = _grads(model, ids, True)
    torch.testing.assert_close(loss_ck, loss_ref, atol=0, rtol=0)
    assert ref.keys() == ck.keys()
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(ck[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    # The layers' intermediates are not kept: less than half the saved bytes here.
    assert saved_ck < 0.5 * saved_ref, (saved_ck, saved_ref)


def test_checkpointing_middle_stage_gives_input_gradients():
    # A pipeline stage past the first takes hidden states that need a gradient.
    stage = StageSpec(range(1, 3), has_embedding=False, has_head=False)
    model = build_model(CFG, "lm", seed=2, stage=stage).train()
    h0 = torch.randn(2, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        h = h0.clone().requires_grad_()
        model(h).square().sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_no_recomputation_outside_training():
    model = build_model(CFG, "lm", seed=3)
    model.gradient_checkpointing = True
    calls = []
    layer = next(iter(model.model.layers.values()))
    # A pre-hook: the recompute stops early (once it has what backward needs), so a hook
    # at the end of the layer's forward would not see it.
    layer.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        model.train()(ids)
    model.eval()(ids).sum().backward()
    assert len(calls) == 2  # one forward each, no recompute
    calls.clear()
    model.train()(ids).sum().backward()
    assert len(calls) == 2  # forward, then the recompute in backward
