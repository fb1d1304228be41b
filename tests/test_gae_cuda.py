"""GAE on CUDA: the cupy kernel and the torch backend against the CPU reference.

Skipped without a CUDA device (and the cupy tests without cupy)."""

import pytest
import torch

from fusedrl.kernels import gae as gae_mod
from fusedrl.kernels.gae import compute_gae
from fusedrl.kernels.gae_cuda import have_cupy
from test_gae import ragged_batch, reference_gae  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_BACKENDS = ["torch"] + (["cupy"] if have_cupy() else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_matches_reference(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    for (B, T), (gamma, lam) in zip([(1, 1), (3, 5), (5, 65), (300, 257), (7, 2000)],
                                    [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0),
                                     (0.99, 0.95)], strict=True):
        rewards, values, mask = ragged_batch(B, T, gen, dtype=dtype)
        want_adv, want_ret = reference_gae(rewards, values, mask, gamma, lam)
        adv, ret = compute_gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma, lam,
                               backend=backend)
        assert adv.device.type == "cuda" and adv.dtype == dtype
        tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=0)
        torch.testing.assert_close(adv.cpu().double(), want_adv, **tol)
        torch.testing.assert_close(ret.cpu().double(), want_ret, **tol)


@pytest.mark.skipif(not have_cupy(), reason="needs cupy")
def test_auto_picks_cupy_on_cuda(monkeypatch):
    calls = []
    for name, fn in list(gae_mod.BACKENDS.items()):
        monkeypatch.setitem(gae_mod.BACKENDS, name,
                            lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    r = torch.zeros(2, 3, device="cuda")
    compute_gae(r, r, torch.ones(2, 3, device="cuda"), backend="auto")
    assert calls == ["cupy"]
