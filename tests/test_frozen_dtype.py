"""Frozen models in ``model.frozen_dtype`` (bfloat16 by default): the reference is the
initial actor rounded to bf16, on one device and on Ray (filled by the reallocation
engine, which converts while it copies), and its log-probs stay close to the float32
actor's (the KL penalty of the first iteration, before any update, is the rounding's)."""

from __future__ import annotations

import pytest
import torch

from fusedrl.config import ConfigError, load_config

SMALL = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "generation.max_new_tokens=6", "data.num_prompts=32", "trainer.iterations=1"]


def in_bf16_model(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight as a bfloat16 model holds it: matrices in bf16, norm weights
    (1-D) kept in float32 (models.llama)."""
    return w.to(torch.bfloat16) if w.dim() > 1 else w


def test_frozen_dtype_is_checked():
    with pytest.raises(ConfigError, match="model.frozen_dtype"):
        load_config(None, ["model.frozen_dtype=float16"])


def test_single_device_reference_is_the_actor_in_bf16():
    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, SMALL))
    try:
        m = t.stages.models
        actor, ref = dict(m.actor.named_parameters()), dict(m.ref.named_parameters())
        assert {p.dtype for p in actor.values()} == {torch.float32}
        for k, p in actor.items():
            assert torch.equal(ref[k], in_bf16_model(p.detach())), k
        metrics = t.step()
    finally:
        t.close()
    # Before the first update old_logp (float32 actor) and ref_logp (bf16 reference) differ
    # only by the rounding: a KL above 0 and far below a policy step's (~1e-2).
    assert 0.0 < abs(metrics["actor/reward_kl_penalty"]) < 1e-3


def test_frozen_compute_dtype_is_checked():
    with pytest.raises(ConfigError, match="model.frozen_compute_dtype"):
        load_config(None, ["model.frozen_compute_dtype=fp8"])


@pytest.mark.parametrize("head", ["lm", "value"])
def test_bf16_weights_computing_in_float32_equal_a_float32_model_of_those_weights(head):
    """``compute_dtype=float32`` on bf16 storage: the float32 forward of the bf16-rounded
    weights (what ``frozen_compute_dtype: auto`` runs on a CPU without bf16 matmuls),
    with the parameters themselves left in bf16."""
    from fusedrl.models.build import build_model
    from fusedrl.models.config import PRESETS

    mc = PRESETS["tiny"]
    f32 = build_model(mc, head, None, seed=3)
    if head == "value":  # the value head starts at zero: give it weights
        torch.nn.init.normal_(f32.score.weight)
    state = {k: in_bf16_model(v).float() if v.dim() > 1 else v
             for k, v in f32.hf_state_dict().items()}
    rounded = build_model(mc, head, state)
    mixed = build_model(mc, head, f32.hf_state_dict(), dtype=torch.bfloat16,
                        compute_dtype=torch.float32)
    assert {p.dtype for p in mixed.parameters() if p.dim() > 1} == {torch.bfloat16}
    assert mixed.activation_dtype == torch.float32 and mixed.param_dtype == torch.bfloat16
    ids = torch.randint(0, mc.vocab_size, (3, 11))
    with torch.no_grad():
        out, want = mixed(ids), rounded(ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # the bf16 forward itself differs by bf16 rounding of the activations
    bf16 = build_model(mc, head, f32.hf_state_dict(), dtype=torch.bfloat16)
    with torch.no_grad():
        assert not torch.allclose(bf16(ids).float(), want, rtol=1e-4, atol=1e-4)


def test_auto_compute_dtype_follows_the_cpu():
    from fusedrl.models.build import resolve_compute_dtype

    has_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_compute_dtype(torch.bfloat16, "cpu") == (
        torch.bfloat16 if has_bf16 else torch.float32)
    assert resolve_compute_dtype(torch.float32, "cpu") == torch.float32
    assert resolve_compute_dtype(torch.bfloat16, "cpu", "bfloat16") == torch.bfloat16
    assert resolve_compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16


def test_float32_reference_equals_the_actor():
    from fusedrl.runtime.launch import make_trainer

    t = make_trainer(load_config(None, SMALL + ["model.frozen_dtype=float32"]))
    try:
        metrics = t.step()
    finally:
        t.close()
    assert metrics["actor/reward_kl_penalty"] == 0.0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("interstage,ref", [(False, "dp1tp2pp1@0-1"), (True, "dp1tp2pp1@0-1"),
                                           (False, "dp1tp1pp2@0-1")])
def test_ray_reference_is_converted_by_the_reallocation(ray_session, tmp_path, interstage, ref):
    """actor_train (dp2, float32) -> ref (tp2 or pp2, bf16) through the reallocation
    engine; with inter-stage fusion the one-device copies ``ref@d`` are bf16 too. With
    pp2 the second stage receives bf16 hidden states although its first parameter (a
    norm weight) is float32."""
    import ray
    from safetensors.torch import load_file

    from fusedrl.runtime.launch import make_trainer

    cfg = load_config(None, SMALL + ["cluster.devices=2", "placement.default=dp2tp1pp1@0-1",
                                     f"placement.ref={ref}",
                                     f"fusion.interstage={str(interstage).lower()}"])
    t = make_trainer(cfg)
    try:
        workers = t.stages.cluster.workers
        for role in ("actor_train", "ref"):
            ray.get([w.save_model.remote(role, str(tmp_path / role)) for w in workers])
        actor = load_file(str(tmp_path / "actor_train/model.safetensors"))
        ref = load_file(str(tmp_path / "ref/model.safetensors"))
        assert sorted(ref) == sorted(actor)
        for k, v in actor.items():
            assert v.dtype == torch.float32 and torch.equal(ref[k], in_bf16_model(v)), k
        metrics = t.step()
        copies = [k for k in t.stages.cluster.spec.serve if k.startswith("ref@")]
        assert bool(copies) == interstage
        for key in copies:
            dev = t.stages.cluster.spec.serve[key][2]
            ray.get(workers[dev].save_model.remote(key, str(tmp_path / key)))
            copy = load_file(str(tmp_path / key / "model.safetensors"))
            assert all(torch.equal(copy[k], ref[k]) for k in ref), key
    finally:
        t.close()
    assert 0.0 < abs(metrics["actor/reward_kl_penalty"]) < 1e-3
