"""Analytic roofline cost model of a Llama-family model on a GPU cluster.

Every model call is priced from its floating-point operations and the bytes it
moves through device memory (the roofline model, Williams et al. 2009)::

    t = max(FLOPs / (peak_flops * mfu_phase), bytes / (hbm_bandwidth * bw_eff_phase))
        + collective time + overhead_phase

per pipeline stage, for four *phases*: ``prefill`` (prompt pass of generation),
``decode`` (one token for every running sequence, continuous batching: the batch
attends to all its context tokens), ``infer`` (a full forward with per-token
outputs: reference log-probs, reward, critic values) and ``train`` (forward and
backward, backward = 2x forward FLOPs, Narayanan et al. SC'21 eq. 2, plus one
more forward with activation recomputation).

Counts, per decoder layer and tensor-parallel rank (``t`` = tp degree, ``h``
hidden, ``q``/``kv`` query/key-value widths, ``i`` MLP width, ``d`` dtype bytes):

* linear FLOPs per token: ``2 * (h*(q + 2kv) + q*h + 3*h*i) / t`` (a multiply and
  an add per weight);
* attention FLOPs per (query, key) pair: ``4 * q / t`` (``QK^T`` and ``AV``); a
  causal prefill of ``L`` tokens has ``L(L+1)/2`` pairs, a decode step one pair
  per context token of the batch;
* weight bytes: the rank's shard of the layer, read once per pass;
* KV bytes: ``2 * kv_local * d`` per token written, and per context token read
  in decode;
* activation bytes per token: ``d * (8h + (2q + 2kv + 3i)/t)`` (every matmul's
  input and output once, the norms' reads and writes);
* tensor-parallel collectives: two all-reduces of ``tokens * h * d`` bytes per
  layer per forward (Megatron, Shoeybi et al. 2019), two more per backward; ring
  all-reduce time ``2 (t-1)/t * bytes / bandwidth`` plus ``2 (t-1)`` latencies;
* the LM head: ``2 h V / t`` FLOPs per token whose logits are needed (every token
  for inference and training, the last one for generation), fp32 logits written.

The efficiency factors (:class:`Efficiency`) say how close the engine comes to
the hardware's limits; :func:`calibrate` sets them from measured profiles
(``fusedrl.sim.calibration`` builds those on the real native engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable, Sequence

import numpy as np

from fusedrl.layout import ParallelLayout
from fusedrl.models.config import ModelConfig
from fusedrl.scheduler.gen_cost import GenCostModel, _nonneg_lstsq

PHASES = ("prefill", "decode", "infer", "train")


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its links. Defaults: an NVIDIA H100 SXM node of 8 GPUs."""

    name: str = "H100-SXM"
    peak_flops: float = 989e12
    """Dense bf16 tensor-core FLOP/s."""
    hbm_bandwidth: float = 3.35e12
    """Device-memory bytes per second."""
    hbm_bytes: float = 80e9
    """Device memory."""
    intra_node_bandwidth: float = 450e9
    """NVLink bytes per second per GPU, one direction."""
    inter_node_bandwidth: float = 50e9
    """InfiniBand bytes per second per GPU (one 400 Gb/s NIC per GPU)."""
    host_bandwidth: float = 55e9
    """Host-to-device bytes per second (PCIe Gen5 x16, effective)."""
    gpus_per_node: int = 8
    """Devices that share the intra-node link."""
    collective_latency_s: float = 8e-6
    """Per-hop latency of a collective or p2p message."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Hardware.{f.name} must be a finite number >= 0, got {v!r}")
            if f.name != "collective_latency_s" and v <= 0:
                raise ValueError(f"Hardware.{f.name} must be > 0, got {v!r}")

    def link_bandwidth(self, devices_spanned: int) -> float:
        """Bandwidth of a group of consecutive devices: NVLink within a node, IB across."""
        return (self.intra_node_bandwidth if devices_spanned <= self.gpus_per_node
                else self.inter_node_bandwidth)


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak FLOP/s (``mfu_*``) and of memory bandwidth
    (``bw_eff_*``) per phase, a fixed cost per call (``overhead_*_s``: kernel
    launches, the engine's host work) and the fraction of link bandwidth the
    collectives reach. Defaults are typical of vLLM/Megatron on H100 (training
    ~45% MFU, decode ~70% of HBM bandwidth); calibrate them for a real engine."""

    mfu_prefill: float = 0.6
    bw_eff_prefill: float = 0.7
    mfu_decode: float = 0.5
    bw_eff_decode: float = 0.7
    mfu_infer: float = 0.6
    bw_eff_infer: float = 0.7
    mfu_train: float = 0.45
    bw_eff_train: float = 0.7
    overhead_prefill_s: float = 1e-3
    overhead_decode_s: float = 1e-3
    overhead_infer_s: float = 1e-3
    overhead_train_s: float = 1e-3
    comm_eff: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Efficiency.{f.name} must be a finite number >= 0, got {v!r}")
            if not f.name.startswith("overhead") and v <= 0:
                raise ValueError(f"Efficiency.{f.name} must be > 0, got {v!r}")

    def mfu(self, phase: str) -> float:
        return getattr(self, f"mfu_{_phase(phase)}")

    def bw_eff(self, phase: str) -> float:
        return getattr(self, f"bw_eff_{_phase(phase)}")

    def overhead_s(self, phase: str) -> float:
        return getattr(self, f"overhead_{_phase(phase)}_s")


def _phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")
    return phase


@dataclass(frozen=True)
class Work:
    """What one call does on one device: FLOPs, device-memory bytes, link time."""

    flops: float = 0.0
    bytes: float = 0.0
    comm_s: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes,
                    self.comm_s + other.comm_s)

    def scale(self, k: float) -> "Work":
        return Work(self.flops * k, self.bytes * k, self.comm_s * k)


class Roofline:
    """Roofline times of ``model`` calls on ``hardware`` (see the module doc).

    ``dtype_bytes``: 2 for bf16 weights/activations/KV (the GPU setting), 4 for the
    float32 CPU engine. ``recompute``: full activation recomputation in training
    (one more forward in the backward, activations of a layer's input only).
    """

    def __init__(self, model: ModelConfig, hardware: Hardware = Hardware(),
                 efficiency: Efficiency = Efficiency(), dtype_bytes: int = 2,
                 recompute: bool = False):
        if dtype_bytes not in (1, 2, 4):
            raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {dtype_bytes}")
        self.model, self.hw, self.eff = model, hardware, efficiency
        self.dtype_bytes, self.recompute = dtype_bytes, recompute

    def with_efficiency(self, efficiency: Efficiency) -> "Roofline":
        return Roofline(self.model, self.hw, efficiency, self.dtype_bytes, self.recompute)

    # -- per-rank shapes ---------------------------------------------------------------

    def kv_local(self, tp: int) -> int:
        """Key (or value) width one tp rank holds (a replicated head when kv < tp)."""
        m = self.model
        return max(1, m.num_kv_heads // tp) * m.head_dim

    def layer_params(self, tp: int) -> float:
        """Parameters of one decoder layer on one tp rank."""
        m = self.model
        h, q, i = m.hidden_size, m.q_size, m.intermediate_size
        return h * q / tp + 2 * h * self.kv_local(tp) + q * h / tp + 3 * h * i / tp + 2 * h

    def params_per_device(self, layout: ParallelLayout, head: str = "lm") -> float:
        """Largest per-device parameter count (the first stage's layers + embedding
        or the last stage's + head, whichever is larger)."""
        m = self.model
        layers = math.ceil(m.num_layers / layout.pp)
        emb = m.vocab_size * m.hidden_size / layout.tp
        head_p = emb if head == "lm" else m.hidden_size
        ends = emb + head_p if layout.pp == 1 else max(emb, head_p + m.hidden_size)
        return layers * self.layer_params(layout.tp) + ends

    def kv_bytes_per_token(self, tp: int) -> float:
        """KV-cache bytes one token holds on one tp rank over all layers."""
        return 2 * self.kv_local(tp) * self.dtype_bytes * self.model.num_layers

    # -- work of the pieces --------------------------------------------------------------

    def _allreduce_s(self, nbytes: float, group: int, spanned: int) -> float:
        """Ring all-reduce of ``nbytes`` over ``group`` ranks spread on ``spanned`` devices."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        bw = self.hw.link_bandwidth(spanned) * self.eff.comm_eff
        return 2 * (group - 1) / group * nbytes / bw + 2 * (group - 1) * self.hw.collective_latency_s

    def layers_work(self, layers: int, tokens: float, attn_pairs: float, tp: int,
                    kv_read_tokens: float = 0.0, kv_write_tokens: float = 0.0) -> Work:
        """Forward of ``layers`` decoder layers over ``tokens`` tokens on one tp rank."""
        m, d = self.model, self.dtype_bytes
        h, q, i = m.hidden_size, m.q_size, m.intermediate_size
        kvl = self.kv_local(tp)
        linear = 2 * (h * q / tp + 2 * h * kvl + q * h / tp + 3 * h * i / tp) * tokens
        attn = 4 * q / tp * attn_pairs
        weight_bytes = self.layer_params(tp) * d
        act_bytes = d * (8 * h + (2 * q + 3 * i) / tp + 2 * kvl) * tokens
        kv_bytes = 2 * kvl * d * (kv_read_tokens + kv_write_tokens)
        comm = 2 * self._allreduce_s(tokens * h * d, tp, tp)
        return Work(linear + attn, weight_bytes + act_bytes + kv_bytes, comm).scale(layers)

    def head_work(self, tokens: float, tp: int, head: str) -> Work:
        """Final norm and head over ``tokens`` tokens (LM head: vocab-parallel logits)."""
        m, d = self.model, self.dtype_bytes
        if head == "value":
            return Work(2 * m.hidden_size * tokens, d * m.hidden_size * (2 * tokens + 1))
        v_local = m.vocab_size / tp
        return Work(2 * m.hidden_size * v_local * tokens,
                    d * m.hidden_size * (v_local + tokens) + 4 * v_local * tokens)

    def time_s(self, work: Work, phase: str) -> float:
        """Roofline time of ``work`` in ``phase`` (compute or memory bound) + links + overhead."""
        compute = work.flops / (self.hw.peak_flops * self.eff.mfu(phase))
        memory = work.bytes / (self.hw.hbm_bandwidth * self.eff.bw_eff(phase))
        return max(compute, memory) + work.comm_s + self.eff.overhead_s(phase)

    def bound(self, work: Work, phase: str) -> str:
        """``"compute"`` or ``"memory"``: which roof limits ``work``."""
        compute = work.flops / (self.hw.peak_flops * self.eff.mfu(phase))
        memory = work.bytes / (self.hw.hbm_bandwidth * self.eff.bw_eff(phase))
        return "compute" if compute >= memory else "memory"

    def _p2p_s(self, nbytes: float, layout: ParallelLayout) -> float:
        """One pipeline hop: stage ranks are ``tp*dp`` devices apart."""
        bw = self.hw.link_bandwidth(layout.tp * layout.dp + 1) * self.eff.comm_eff
        return nbytes / bw + self.hw.collective_latency_s

    def _stage_layers(self, layout: ParallelLayout) -> list[int]:
        """Layers per stage: ``numpy.array_split`` sizes (DESIGN.md sharding contract)."""
        return [len(a) for a in np.array_split(np.arange(self.model.num_layers), layout.pp)]

    # -- calls -------------------------------------------------------------------------------

    def pass_work(self, layout: ParallelLayout, tokens: float, attn_pairs: float,
                  head_tokens: float, head: str, kv_read_tokens: float = 0.0,
                  kv_write_tokens: float = 0.0) -> list[Work]:
        """Per-stage work of one forward pass (embedding lookup on stage 0 is a gather)."""
        out = []
        stages = self._stage_layers(layout)
        for s, n in enumerate(stages):
            w = self.layers_work(n, tokens, attn_pairs, layout.tp, kv_read_tokens, kv_write_tokens)
            if s == 0:
                w = w + Work(0.0, self.dtype_bytes * self.model.hidden_size * tokens)
            if s == len(stages) - 1:
                w = w + self.head_work(head_tokens, layout.tp, head)
            else:
                w = w + Work(comm_s=self._p2p_s(tokens * self.model.hidden_size
                                                * self.dtype_bytes, layout))
            out.append(w)
        return out

    def _serial_s(self, works: Sequence[Work], phase: str) -> float:
        """Stages one after another (the overhead counted once per call)."""
        over = self.eff.overhead_s(phase)
        return sum(self.time_s(w, phase) - over for w in works) + over

    def prefill_works(self, batch: int, prompt_len: int,
                      layout: ParallelLayout = ParallelLayout(), head: str = "lm") -> list[Work]:
        """Prompt pass of ``batch`` sequences of ``prompt_len`` tokens (logits of the last)."""
        pairs = batch * prompt_len * (prompt_len + 1) / 2
        return self.pass_work(layout, batch * prompt_len, pairs, batch, head,
                              kv_write_tokens=batch * prompt_len)

    def decode_works(self, batch: int, context_tokens: float,
                     layout: ParallelLayout = ParallelLayout()) -> list[Work]:
        """One decode step of ``batch`` sequences holding ``context_tokens`` in all."""
        return self.pass_work(layout, batch, context_tokens, batch, "lm",
                              kv_read_tokens=context_tokens, kv_write_tokens=batch)

    def forward_works(self, batch: int, seq_len: float,
                      layout: ParallelLayout = ParallelLayout(), head: str = "lm") -> list[Work]:
        """Inference forward of ``batch`` sequences with every token's output."""
        tokens = batch * seq_len
        return self.pass_work(layout, tokens, batch * seq_len * (seq_len + 1) / 2, tokens, head)

    def train_works(self, micro_batch: int, seq_len: float,
                    layout: ParallelLayout = ParallelLayout(), head: str = "lm"
                    ) -> tuple[list[Work], list[Work]]:
        """Per-stage (forward, backward) work of one training micro-batch.

        Backward = 2x the forward's FLOPs and bytes (weight and input gradients,
        Narayanan et al. SC'21), plus one forward with recomputation; its tp
        all-reduces as many as the forward's."""
        fwd = self.forward_works(micro_batch, seq_len, layout, head)
        back = 3.0 if self.recompute else 2.0
        return fwd, [Work(w.flops * back, w.bytes * back, w.comm_s * (back - 1)) for w in fwd]

    def prefill_s(self, batch: int, prompt_len: int, layout: ParallelLayout = ParallelLayout(),
                  head: str = "lm") -> float:
        return self._serial_s(self.prefill_works(batch, prompt_len, layout, head), "prefill")

    def decode_step_s(self, batch: int, context_tokens: float,
                      layout: ParallelLayout = ParallelLayout()) -> float:
        if batch <= 0:
            return 0.0
        return self._serial_s(self.decode_works(batch, context_tokens, layout), "decode")

    def forward_s(self, batch: int, seq_len: float, layout: ParallelLayout = ParallelLayout(),
                  head: str = "lm") -> float:
        return self._serial_s(self.forward_works(batch, seq_len, layout, head), "infer")

    def train_stage_s(self, micro_batch: int, seq_len: float, layout: ParallelLayout,
                      head: str = "lm") -> tuple[list[float], list[float]]:
        """Per-stage (forward, backward) seconds of one training micro-batch."""
        fwd, bwd = self.train_works(micro_batch, seq_len, layout, head)
        return [self.time_s(w, "train") for w in fwd], [self.time_s(w, "train") for w in bwd]

    def activation_bytes(self, micro_batch: int, seq_len: float, layout: ParallelLayout) -> float:
        """Activations one micro-batch holds on the largest stage until its backward.

        Korthikanti et al. 2022 (eq. 2, no sequence parallelism): per layer
        ``s b h (10 + 24/t + 5 a s / (h t))`` bytes in 16-bit; with full
        recomputation only the layer input ``2 s b h``."""
        m = self.model
        s, b, h, a, t = seq_len, micro_batch, m.hidden_size, m.num_heads, layout.tp
        per_layer = (2 * s * b * h if self.recompute
                     else s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
        return per_layer * self.dtype_bytes / 2 * max(self._stage_layers(layout))

    def train_state_bytes(self, layout: ParallelLayout, head: str = "lm") -> float:
        """Parameters, gradients and Adam states per device: 16-bit params and grads,
        fp32 master/m/v sharded over dp (a distributed optimizer, ZeRO-1)."""
        p = self.params_per_device(layout, head)
        return p * (2 * self.dtype_bytes + 12 / layout.dp)

    def grad_sync_s(self, layout: ParallelLayout, head: str = "lm") -> float:
        """DP gradient all-reduce after a mini-batch (ring over dp, stride ``tp``)."""
        nbytes = self.params_per_device(layout, head) * self.dtype_bytes
        return self._allreduce_s(nbytes, layout.dp, layout.dp * layout.tp)

    def optimizer_s(self, layout: ParallelLayout, head: str = "lm") -> float:
        """Adam step, memory bound: fp32 master, m, v and 16-bit grad read, all written
        back with the 16-bit params (28 bytes per parameter) on the rank's dp shard."""
        p = self.params_per_device(layout, head) / layout.dp
        return 28 * p / (self.hw.hbm_bandwidth * self.eff.bw_eff("train"))

    # -- the generation simulator's cost model ------------------------------------------------

    def gen_cost_model(self, layout: ParallelLayout, *, max_batch: int, prompt_len: int,
                       max_new_tokens: int, infer: Iterable["Roofline | tuple[Roofline, str]"] = (),
                       kv_capacity_bytes: float, weight_load_s: float = 0.0,
                       transfer_bandwidth: float | None = None) -> GenCostModel:
        """A :class:`GenCostModel` for one generation instance under ``layout``.

        The decode terms are :meth:`GenCostModel.fit` to this roofline's decode steps
        over a grid of batches (1 .. ``max_batch``) and contexts (prompt .. prompt +
        ``max_new_tokens``), so ``bs_max`` is where the roofline's throughput
        saturates; prefill the same over admission sizes. ``infer``: the inference
        models run on the instance after generation (rooflines, each with its head:
        reference ``lm``, reward and critic ``value``); their per-token time is a
        forward of a ``max_batch``-sample batch at the mean sequence length.
        ``transfer_bandwidth`` (KV migration between instances) defaults to every tp
        rank sending its shard over its inter-node link.
        """
        if max_batch < 1 or prompt_len < 0 or max_new_tokens < 1:
            raise ValueError("gen_cost_model: need max_batch >= 1, prompt_len >= 0, "
                             "max_new_tokens >= 1")
        batches = sorted({int(b) for b in np.unique(np.geomspace(1, max_batch, 8).round())})
        contexts = [max(1, prompt_len), prompt_len + max_new_tokens // 2, prompt_len + max_new_tokens]
        points = [(b, c, self.decode_step_s(b, b * c, layout)) for b in batches for c in contexts]
        p = max(1, prompt_len)
        prefill = [(n * p, self.prefill_s(n, p, layout)) for n in (1, 4, 16)]
        mean_len = prompt_len + max_new_tokens / 2
        per_token = 0.0
        for item in infer:
            roof, head = item if isinstance(item, tuple) else (item, "lm")
            per_token += roof.forward_s(max_batch, mean_len, layout, head) / (max_batch * mean_len)
        bw = transfer_bandwidth or self.hw.inter_node_bandwidth * layout.tp * self.eff.comm_eff
        return GenCostModel.fit(
            points, prefill_points=prefill, infer_per_token_s=per_token,
            kv_bytes_per_token=self.kv_bytes_per_token(layout.tp) * layout.tp,
            kv_capacity_bytes=max(kv_capacity_bytes, 1.0), transfer_bandwidth=bw,
            weight_load_s=weight_load_s)


# -- calibration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfilePoint:
    """One measured call: its phase, the roofline's work for it, the measured seconds."""

    phase: str
    work: Work
    measured_s: float
    label: str = ""


def calibrate(efficiency: Efficiency, roofline: Roofline,
              points: Sequence[ProfilePoint]) -> Efficiency:
    """Efficiency factors that make ``roofline`` reproduce the measured times.

    Per phase, ``measured = r * (roofline time without overhead) + c`` is fitted by
    non-negative least squares (``c`` only when the points' roofline times differ,
    so it is identifiable); the phase's ``mfu`` and ``bw_eff`` are divided by ``r``
    -- scaling both roofs by ``1/r`` scales ``max(compute, memory)`` by exactly
    ``r`` -- and its overhead set to ``c``. With one point, ``r`` is the
    measured/predicted ratio. Phases without points keep their factors.
    """
    changes: dict[str, float] = {}
    for phase in PHASES:
        pts = [p for p in points if p.phase == phase]
        if not pts:
            continue
        base = roofline.with_efficiency(efficiency)
        pure = np.array([base.time_s(p.work, phase) - efficiency.overhead_s(phase)
                         - p.work.comm_s for p in pts])
        y = np.array([p.measured_s - p.work.comm_s for p in pts])
        if (pure <= 0).any() or (y <= 0).any():
            raise ValueError(f"calibrate: phase {phase} has a point with no work or time")
        if len(pts) >= 2 and np.ptp(pure) > 1e-3 * pure.max():
            r, c = _nonneg_lstsq(np.stack([pure, np.ones_like(pure)], axis=1), y)
        else:
            r, c = float(np.mean(y / pure)), 0.0
        if r <= 0:  # all time is overhead: keep the roofs, fit the constant alone
            r, c = 1.0, float(np.mean(y))
        changes[f"mfu_{phase}"] = efficiency.mfu(phase) / r
        changes[f"bw_eff_{phase}"] = efficiency.bw_eff(phase) / r
        changes[f"overhead_{phase}_s"] = float(c)
    return replace(efficiency, **changes)
