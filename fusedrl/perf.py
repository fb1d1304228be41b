"""Model FLOPs utilisation (MFU): achieved model FLOP/s of a call over the devices' peak.

The model FLOPs of ``T`` tokens through a dense decoder of ``N`` matmul parameters are
``2 N T`` for a forward and ``6 N T`` for a forward and backward (Kaplan et al. 2020,
§2.1; the PaLM paper's MFU, Chowdhery et al. 2022, App. B). ``N`` counts the weights
that multiply activations (projections, MLP, the LM or value head), not the input
embedding (a lookup); attention's ``T^2`` term is left out (prompts and responses of
RLHF here are short: under 2% for SmolLM2 at 100 tokens). Recomputation (gradient
checkpointing) is not counted: it is hardware FLOPs, not model FLOPs. Tokens are the
real ones (padding is waste, not work).

The peak is the hard part. A GPU has a datasheet figure (dense bf16 tensor-core peak,
:data:`DATASHEET_BF16_PEAK`): ``perf/mfu/<call>`` is against it, as verl reports. A
CPU has no honest datasheet figure for this process (threads, AVX frequency, a
shared machine), so unless ``cluster.peak_flops`` states one, the peak is *measured*:
the best of a few float32 matmuls at startup (:func:`measured_peak_flops`, cached),
and the metric is named ``perf/mfu_measured_peak/<call>`` with the probe's figure in
``perf/peak_flops_measured``. It is a utilisation against what this process's matmul
reached, not against the silicon's capability.
"""

from __future__ import annotations

import functools
import time

DATASHEET_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core FLOP/s per GPU (NVIDIA datasheets, SXM, without sparsity),
looked up by a substring of ``torch.cuda.get_device_name``. H100 PCIe is lower (756e12);
its name contains "PCIe" and it falls back to a measured peak."""


def matmul_params(config, head: str = "lm") -> int:
    """Parameters of ``config`` that multiply activations: per layer q, k, v, o and the
    gated MLP, plus the LM head (``vocab x hidden``, also when tied to the embedding)
    or the value head (``hidden``)."""
    h, d = config.hidden_size, config.head_dim
    attn = h * config.num_heads * d * 2 + h * config.num_kv_heads * d * 2
    mlp = 3 * h * config.intermediate_size
    out = config.vocab_size * h if head == "lm" else h
    return config.num_layers * (attn + mlp) + out


@functools.cache
def measured_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``size x size`` matmuls on the CPU with
    this process's torch threads, after a warm-up: a peak this process reached, measured
    once per process (a loaded machine lowers it, and the MFU against it rises)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def datasheet_peak(device) -> float | None:
    """The datasheet bf16 peak of a CUDA ``device`` (None: CPU or an unknown GPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name:
        return None
    return next((v for k, v in DATASHEET_BF16_PEAK.items() if k in name), None)


def peak_flops(config, device) -> tuple[float, str]:
    """``(peak FLOP/s of one device, metric prefix)``: ``cluster.peak_flops`` if set,
    else the datasheet figure of a known GPU (both ``perf/mfu``), else a measured one
    (``perf/mfu_measured_peak``)."""
    if config.cluster.peak_flops > 0:
        return config.cluster.peak_flops, "perf/mfu"
    sheet = datasheet_peak(device)
    if sheet is not None:
        return sheet, "perf/mfu"
    return measured_peak_flops(), "perf/mfu_measured_peak"


def iteration_mfu(config, model_config, tokens: int, timing: dict, placements: dict | None,
                  device) -> dict[str, float]:
    """MFU of an iteration's calls from their busy seconds (``timing``: the busiest
    device's, ``timing_s/*``) on ``tokens`` real tokens: ``actor`` and ``critic`` updates
    (``6 N T`` per PPO epoch), the ``ref`` forward (``2 N T``). The FLOPs spread over
    the devices of the call's placement (``placements``: role -> placement; None: one
    device). Also ``perf/peak_flops_measured`` when the peak is measured."""
    from fusedrl.layout import Placement

    def devices(role: str) -> int:
        if not placements or role not in placements:
            return 1
        return len(Placement.parse(placements[role]).devices)

    try:
        peak, prefix = peak_flops(config, device)
    except (RuntimeError, AssertionError):  # a CUDA run whose controller has no GPU
        return {}
    epochs = config.ppo.ppo_epochs
    lm, value = matmul_params(model_config, "lm"), matmul_params(model_config, "value")
    calls = {"actor": (6 * lm * tokens * epochs, timing.get("update_actor"), devices("actor_train")),
             "critic": (6 * value * tokens * epochs, timing.get("update_critic"),
                        devices("critic_train")),
             "ref": (2 * lm * tokens, timing.get("ref"), devices("ref"))}
    out = {f"{prefix}/{name}": flops / (seconds * n * peak)
           for name, (flops, seconds, n) in calls.items() if seconds}
    if prefix == "perf/mfu_measured_peak":
        out["perf/peak_flops_measured"] = peak
    return out
