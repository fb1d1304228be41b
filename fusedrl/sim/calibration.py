"""Calibrating the roofline on the real native engine (on this machine's CPU).

The roofline (:mod:`fusedrl.sim.roofline`) needs the machine's peaks and the
engine's efficiency. On CPU both are measured here: the peak FLOP/s is a large
float32 matmul's, the memory bandwidth a large copy's (read + write). Then the
real engine runs (``GenerationEngine`` for prefill and decode steps, the
``Llama`` module for inference forwards and training forward/backward), each
call is timed, and :func:`~fusedrl.sim.roofline.calibrate` sets the efficiency
factors so that the roofline reproduces the measurements. The same procedure
with a GPU's profile calibrates the cluster simulator.

Each device is emulated by one core (docs/design.md "Measuring"): ``threads=1``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fusedrl.layout import ParallelLayout
from fusedrl.models.config import ModelConfig
from fusedrl.sim.roofline import (PHASES, Efficiency, Hardware, ProfilePoint, Roofline, Work,
                                  calibrate)


def best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls (the least disturbed by other jobs)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_hardware(threads: int = 1, matmul_size: int = 768, copy_mib: int = 64,
                         repeats: int = 5) -> Hardware:
    """This CPU as a :class:`Hardware`: float32 matmul FLOP/s and copy bandwidth.

    Links (there are none between emulated devices of one process) get the copy
    bandwidth, the node is the whole machine.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(matmul_size, matmul_size)
        b = torch.randn(matmul_size, matmul_size)
        a @ b  # warm-up
        flops = 2 * matmul_size ** 3 / best_time(lambda: a @ b, repeats)
        src = torch.empty(copy_mib * 2 ** 20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        bandwidth = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeats)
    finally:
        torch.set_num_threads(prev)
    return Hardware(name=f"cpu x{threads}", peak_flops=flops, hbm_bandwidth=bandwidth,
                    hbm_bytes=64e9, intra_node_bandwidth=bandwidth,
                    inter_node_bandwidth=bandwidth, host_bandwidth=bandwidth,
                    gpus_per_node=1, collective_latency_s=0.0)


@dataclass(frozen=True)
class ProfileSpec:
    """What :func:`profile_engine` runs (sizes of a quick profile)."""

    decode_batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 16
    decode_steps: int = 24
    prefill_batches: tuple[int, ...] = (1, 4, 16)
    infer_shapes: tuple[tuple[int, int], ...] = ((1, 64), (4, 64), (8, 128))
    train_shapes: tuple[tuple[int, int], ...] = ((1, 64), (4, 64), (8, 128))
    repeats: int = 3
    chunk: int = 4
    """Decode steps are grouped ``chunk`` at a time; a group's median is one point."""


def profile_engine(model: ModelConfig, spec: ProfileSpec = ProfileSpec(), threads: int = 1,
                   seed: int = 0) -> list[ProfilePoint]:
    """Times the real engine on ``model`` (float32, one process) and returns the
    measurements with the roofline work of each call (``work`` of the points uses
    a unit-efficiency roofline, which :func:`calibrate` does not depend on)."""
    import torch

    from fusedrl.generation.engine import GenerationEngine, Request
    from fusedrl.generation.sampling import SamplingParams
    from fusedrl.models.build import build_model

    roof = Roofline(model, Hardware(), Efficiency(), dtype_bytes=4)
    one = ParallelLayout()
    total = lambda works: sum(works, Work())  # noqa: E731 - one stage
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    points: list[ProfilePoint] = []
    try:
        net = build_model(model, head="lm", seed=seed).eval()
        rng = np.random.default_rng(seed)
        P, K = spec.prompt_len, spec.decode_steps
        max_seq = P + K + 1
        if max_seq > model.max_position_embeddings:
            raise ValueError(f"profile: prompt_len + decode_steps = {max_seq} exceeds the "
                             f"model's max_position_embeddings={model.max_position_embeddings}")
        params = SamplingParams(max_new_tokens=K, ignore_eos=True, seed=seed)
        batches = sorted(set(spec.decode_batches) | set(spec.prefill_batches))
        for rep in range(spec.repeats + 1):  # the first pass warms up
            for B in batches:
                engine = GenerationEngine(net, max_batch_size=B, max_seq_len=max_seq)
                engine.start(params)
                engine.add([Request(i, rng.integers(1, model.vocab_size, P).tolist())
                            for i in range(B)])
                times = []
                while engine.has_unfinished():
                    t0 = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - t0)
                if rep == 0:
                    continue
                if B in spec.prefill_batches:  # step 1: prefill + the first token's sampling
                    points.append(ProfilePoint("prefill", total(roof.prefill_works(B, P, one)),
                                               times[0], f"prefill b={B} p={P}"))
                if B in spec.decode_batches:  # step k >= 2 decodes with context P + k - 1
                    for lo in range(1, len(times) - spec.chunk + 1, spec.chunk):
                        ctx = P + lo + (spec.chunk - 1) / 2
                        points.append(ProfilePoint(
                            "decode", total(roof.decode_works(B, B * ctx, one)),
                            float(np.median(times[lo:lo + spec.chunk])), f"decode b={B} ctx={ctx:g}"))
        for b, s in spec.infer_shapes:
            ids = torch.randint(0, model.vocab_size, (b, s))
            with torch.no_grad():
                net(ids)
                t = best_time(lambda: net(ids), spec.repeats)
            points.append(ProfilePoint("infer", total(roof.forward_works(b, s, one)), t,
                                       f"infer b={b} s={s}"))
        net.train()
        for b, s in spec.train_shapes:
            ids = torch.randint(0, model.vocab_size, (b, s))
            fwd_w, bwd_w = roof.train_works(b, s, one)
            fwd_t, bwd_t = float("inf"), float("inf")
            for _ in range(spec.repeats + 1):
                net.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = net(ids).float().mean()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                fwd_t, bwd_t = min(fwd_t, t1 - t0), min(bwd_t, t2 - t1)
            points.append(ProfilePoint("train", total(fwd_w), fwd_t, f"train fwd b={b} s={s}"))
            points.append(ProfilePoint("train", total(bwd_w), bwd_t, f"train bwd b={b} s={s}"))
    finally:
        torch.set_num_threads(prev)
    return points


@dataclass
class CalibrationReport:
    """Calibrated factors and how well the roofline predicts the profile."""

    hardware: Hardware
    before: Efficiency
    after: Efficiency
    points: list[ProfilePoint]
    ratio_before: dict[str, float] = field(default_factory=dict)
    """Per phase: total predicted / total measured time, default factors."""
    ratio_after: dict[str, float] = field(default_factory=dict)
    """The same with the calibrated factors."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"hardware": asdict(self.hardware), "efficiency": asdict(self.after),
                "predicted_over_measured_before": self.ratio_before,
                "predicted_over_measured_after": self.ratio_after}


def phase_ratios(roofline: Roofline, points: list[ProfilePoint]) -> dict[str, float]:
    """Per phase: sum of predicted times / sum of measured times."""
    out = {}
    for phase in PHASES:
        pts = [p for p in points if p.phase == phase]
        if pts:
            pred = sum(roofline.time_s(p.work, phase) for p in pts)
            out[phase] = pred / sum(p.measured_s for p in pts)
    return out


def calibrate_on_cpu(model: ModelConfig, spec: ProfileSpec = ProfileSpec(), threads: int = 1,
                     start: Efficiency = Efficiency(), seed: int = 0) -> CalibrationReport:
    """Measure this CPU, profile the native engine on ``model``, fit the factors."""
    hw = measure_cpu_hardware(threads)
    points = profile_engine(model, spec, threads, seed)
    roof = Roofline(model, hw, start, dtype_bytes=4)
    after = calibrate(start, roof, points)
    return CalibrationReport(hw, start, after, points, phase_ratios(roof, points),
                             phase_ratios(roof.with_efficiency(after), points))
