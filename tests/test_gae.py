"""GAE kernels against a plain-Python loop (Schulman et al. 2016, eq. 11-16)."""

import pytest
import torch

from fusedrl.kernels import gae as gae_mod
from fusedrl.kernels.gae import HAVE_NUMBA, compute_gae

BACKENDS = ["torch"] + (["numba"] if HAVE_NUMBA else [])


def reference_gae(rewards, values, mask, gamma, lam):
    """Textbook backward loop over each row's valid prefix; V after the last token is 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def ragged_batch(B, T, gen, dtype=torch.float32):
    rewards = torch.randn(B, T, generator=gen, dtype=dtype)
    values = torch.randn(B, T, generator=gen, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T  # at least one full row, and (B > 1) usually an empty or short one
    mask = (torch.arange(T) < lengths[:, None]).to(torch.int64)
    # Garbage on the padding must not leak into any output.
    rewards[mask == 0] = float("nan")
    values[mask == 0] = float("inf")
    return rewards, values, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_random_shapes(backend):
    gen = torch.Generator().manual_seed(0)
    # T straddles the torch backend's block length (64): 1 block, exact, ragged, many.
    shapes = [(1, 1), (3, 5), (4, 64), (5, 65), (2, 200), (3, 300)]
    for (B, T), (gamma, lam) in zip(
        shapes,
        [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0), (0.9, 0.7), (1.0, 0.95)],
        strict=True,
    ):
        rewards, values, mask = ragged_batch(B, T, gen)
        want_adv, want_ret = reference_gae(rewards, values, mask, gamma, lam)
        adv, ret = compute_gae(rewards, values, mask, gamma, lam, backend=backend)
        assert adv.shape == (B, T) and adv.dtype == torch.float32
        torch.testing.assert_close(adv.double(), want_adv, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ret.double(), want_ret, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    # One row of length 2 (third token is padding with a junk value that must be ignored).
    # gamma=0.9, lam=0.5: delta_1 = 1 + 0 - 0.5 = 0.5 (V after EOS is 0)
    # delta_0 = 0 + 0.9*0.5 - 1 = -0.55;  A_0 = -0.55 + 0.45*0.5 = -0.325
    r = torch.tensor([[0.0, 1.0, 7.0]])
    v = torch.tensor([[1.0, 0.5, 100.0]])
    m = torch.tensor([[1, 1, 0]])
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.5, backend=backend)
    torch.testing.assert_close(adv, torch.tensor([[-0.325, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.675, 1.0, 0.0]]))


def test_backends_agree_float64_and_mask_dtypes():
    gen = torch.Generator().manual_seed(1)
    rewards, values, mask = ragged_batch(8, 130, gen, dtype=torch.float64)
    outs = [
        compute_gae(rewards, values, m, 0.99, 0.95, backend=b)
        for b in BACKENDS
        for m in (mask, mask.bool(), mask.float())
    ]
    for adv, ret in outs:
        assert adv.dtype == torch.float64
        torch.testing.assert_close(adv, outs[0][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ret, outs[0][1], atol=1e-10, rtol=1e-10)


def test_auto_picks_numba_on_cpu(monkeypatch):
    calls = []

    def spy(name, fn):
        def wrapped(*args):
            calls.append(name)
            return fn(*args)

        return wrapped

    for name, fn in list(gae_mod.BACKENDS.items()):
        monkeypatch.setitem(gae_mod.BACKENDS, name, spy(name, fn))
    r = torch.zeros(2, 3)
    compute_gae(r, r, torch.ones(2, 3), backend="auto")
    assert calls == (["numba"] if HAVE_NUMBA else ["torch"])


def test_no_grad_and_bf16_inputs():
    v = torch.randn(2, 4, requires_grad=True)
    adv, ret = compute_gae(torch.randn(2, 4).bfloat16(), v, torch.ones(2, 4), backend="torch")
    assert not adv.requires_grad and adv.dtype == torch.float32


def test_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        compute_gae(x, torch.zeros(2, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        compute_gae(torch.zeros(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        compute_gae(x, x, torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
    with pytest.raises(ValueError, match="lam"):
        compute_gae(x, x, torch.ones(2, 4), lam=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        compute_gae(x, x, torch.ones(2, 4), backend="triton")
    with pytest.raises(ValueError, match="backend='cupy' needs CUDA tensors"):
        compute_gae(x, x, torch.ones(2, 4), backend="cupy")
