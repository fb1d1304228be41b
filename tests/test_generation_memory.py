"""The generation engine's own weight copies (the fast path's fused and MKL-packed
weights) are predicted before they exist and counted against the device's memory."""

from __future__ import annotations

import pytest
import torch

from fusedrl.config import load_config
from fusedrl.generation import Request, SamplingParams, fastpath
from fusedrl.generation.backend import make_backend
from fusedrl.models.build import build_model
from fusedrl.models.config import PRESETS
from fusedrl.runtime.memory import pending_generation_bytes

needs_mkl = pytest.mark.skipif(not fastpath._mkl_packing(), reason="MKL packing unavailable")


def _generate(backend) -> None:
    backend.start(SamplingParams(max_new_tokens=3, temperature=0.0))
    backend.add([Request(i, [1, 2, 3]) for i in range(4)])
    while backend.has_unfinished():
        backend.step()


@needs_mkl
@pytest.mark.parametrize("budget", ["none", "head", "all"])
def test_planned_bytes_equal_the_held_bytes(budget):
    """Nothing held before the first step; after it, exactly what was planned: the
    fused q/k/v and gate/up copies, plus the packed weights the budget admits (none,
    the LM head alone, all of them)."""
    model = build_model(PRESETS["tiny"], "lm", seed=0).eval()
    shapes = fastpath.FastForward(model, pack_rows=4)._matrices()
    head = fastpath.packed_size(*shapes[0], 4)
    pack_bytes = {"none": 0, "head": head, "all": 1 << 30}[budget]
    backend = make_backend("native", model, max_batch_size=4, max_seq_len=16,
                           packed_weight_bytes=pack_bytes)
    held, planned = backend.weight_cache_bytes()
    assert held == 0
    _generate(backend)
    assert backend.weight_cache_bytes() == (planned, planned)
    fused = sum(o * i for k, (o, i) in enumerate(shapes) if k % 4 in (1, 3)) * 4
    packed = {"none": 0, "head": head,
              "all": sum(fastpath.packed_size(o, i, 4) for o, i in shapes)}[budget]
    assert planned == fused + packed > 0


@needs_mkl
def test_pending_bytes_count_until_built():
    cfg = load_config(None, ["generation.max_batch_size=4", "generation.packed_weights_gib=1"])
    model = build_model(PRESETS["tiny"], "lm", seed=0).eval()
    before = pending_generation_bytes(model, cfg)
    backend = make_backend("native", model, max_batch_size=4, max_seq_len=16,
                           packed_weight_bytes=1 << 30)
    assert pending_generation_bytes(model, cfg, backend) == before > 0
    _generate(backend)
    assert pending_generation_bytes(model, cfg, backend) == 0
    # other backends hold their own memory, accounted by them
    assert pending_generation_bytes(model, load_config(None, ["generation.backend=vllm"])) == 0
    bf16 = build_model(PRESETS["tiny"], "lm", seed=0, dtype=torch.bfloat16)
    assert pending_generation_bytes(bf16, cfg) < before  # no packing of bf16 weights
