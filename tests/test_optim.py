"""AdamW with bfloat16 moments (``ppo.optimizer_state_dtype``, fusedrl/optim.py):
unbiased stochastic rounding, close to float32 AdamW, resumable, and in the trainer."""

import json

import pytest
import torch

from fusedrl.config import ConfigError, load_config
from fusedrl.optim import AdamW, build_optimizer, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    # values strictly between two bf16 neighbours: 1 + k/3 ulp of 1.0 (ulp = 2^-7)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.tensor(1.0 + 2 ** -7, dtype=torch.bfloat16)
    x = torch.full((200_000,), 1.0 + 2 ** -7 / 3)
    gen = torch.Generator().manual_seed(0)
    r = stochastic_round_to_bf16(x, gen)
    assert r.dtype == torch.bfloat16
    assert set(torch.unique(r.float()).tolist()) == {lo.item(), hi.item()}
    # P(up) = 1/3: the mean equals x to within the sampling error (~1e-5 here)
    assert r.float().mean().item() == pytest.approx(x[0].item(), abs=5e-5)
    # negatives round symmetrically in magnitude; exact bf16 values are kept
    assert stochastic_round_to_bf16(-x, gen).float().mean().item() == pytest.approx(
        -x[0].item(), abs=5e-5)
    exact = torch.tensor([0.5, -3.0, 1024.0])
    assert torch.equal(stochastic_round_to_bf16(exact, gen).float(), exact)


def _train(opt_factory, steps=60, seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(64, 32))
    target = torch.randn(64, 32)
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        ((w - target) ** 2).mean().backward()
        opt.step()
    return w.detach(), opt


def test_bf16_moments_track_float32_adamw():
    ref, _ = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    ours, opt = _train(lambda p: AdamW(p, lr=1e-2, weight_decay=0.1))
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # 60 steps of lr 1e-2 moved the weights by ~0.5; bf16 moments stay within 1% of that
    start, _ = _train(lambda p: AdamW(p, lr=0.0), steps=1)
    moved = (ref - start).abs().mean()
    assert moved > 0.3
    assert (ours - ref).abs().mean() < 0.01 * moved


def test_second_moment_decays_where_nearest_rounding_would_stick():
    w = torch.nn.Parameter(torch.ones(4096))
    opt = AdamW([w], lr=1e-3)
    w.grad = torch.ones(4096)
    opt.step()
    v0 = opt.state[w]["exp_avg_sq"].float().mean().item()
    for _ in range(300):  # zero gradients: v decays by beta2 = 0.999 a step
        w.grad = torch.zeros(4096)
        opt.step()
    v = opt.state[w]["exp_avg_sq"].float().mean().item()
    # 0.999^300 = 0.741; round-to-nearest would leave v0 (0.001 is below bf16's 2^-8)
    assert v == pytest.approx(v0 * 0.999 ** 300, rel=0.02)


def test_resume_from_state_dict_repeats_the_run():
    def run(split):
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(300))
        opt = AdamW([w], lr=1e-2, seed=5)
        for step in range(20):
            if step == split:  # a new optimizer loaded from the checkpointed state
                sd = opt.state_dict()
                w = torch.nn.Parameter(w.detach().clone())
                opt = AdamW([w], lr=1e-2, seed=5)
                opt.load_state_dict(sd)
            w.grad = torch.sin(w.detach() * (step + 1))
            opt.step()
        return w.detach()

    assert torch.equal(run(split=-1), run(split=7))


def test_state_dtype_is_checked():
    with pytest.raises(ConfigError, match="ppo.optimizer_state_dtype"):
        load_config(None, ["ppo.optimizer_state_dtype=int8"])
    with pytest.raises(ValueError, match="int8"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], 1e-3, 0.0, "int8")


def test_trainer_with_bf16_optimizer_state_trains_and_resumes(tmp_path):
    from fusedrl.cli.train import train

    small = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
             "generation.max_new_tokens=6", "data.num_prompts=32",
             "ppo.optimizer_state_dtype=bfloat16", "trainer.save_every=1"]
    full = load_config(None, small + ["trainer.iterations=3"])
    train(full, tmp_path / "a", show_progress=False)
    state = torch.load(tmp_path / "a/checkpoints/iter_3/trainer_state.pt", weights_only=False)
    dtypes = {t.dtype for opt in _optimizer_states(state)
              for s in opt["state"].values() for k, t in s.items() if k != "step"}
    assert dtypes == {torch.bfloat16}
    train(load_config(None, small + ["trainer.iterations=2"]), tmp_path / "b",
          show_progress=False)
    train(full, tmp_path / "b", resume=True, show_progress=False)
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text()
             .splitlines()] for d in ("a", "b"))
    for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "critic/score/mean"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-9), key


def _optimizer_states(state: dict) -> list[dict]:
    """The optimizer state dicts inside a single-device ``trainer_state.pt``."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "state" in x and "param_groups" in x:
                found.append(x)
            else:
                for v in x.values():
                    walk(v)

    walk(state)
    assert found, "no optimizer state in the trainer state"
    return found
