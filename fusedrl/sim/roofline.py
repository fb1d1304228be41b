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

Beyond one roofline over a whole pass (issue 18: the cost model was checked
against verl's published single-GPU GSM8K run, ``configs/verl-gsm8k-qwen05b.yaml``):

* **kernels run one after another.** Only a matmul overlaps its own operand traffic
  with its FLOPs; the norms, rotary embedding, SwiGLU, residual adds and the
  logits' post-processing are separate memory-bound kernels between the matmuls, so
  their bytes (``Work.serial_bytes``) add to the matmuls' roofline instead of hiding
  under it. How many bytes depends on the implementation (:class:`KernelProfile`:
  fused kernels as vLLM/Megatron have them, or transformers' eager modules, which
  compute RMSNorm in fp32 over ~7 kernels). For a 0.5B model (hidden 896) that is
  ~40% on top of the matmuls; for a 13B one a few percent.
* **the host issues every kernel.** A pass cannot take less than its kernel
  launches times the host's cost per launch (``Efficiency.launch_*_s``): PyTorch
  eager dispatch is ~5-15 us a kernel, so small micro-batches and decode steps
  without CUDA graphs are host-bound whatever the GPU (this is the micro-batch
  efficiency of small models);
* **the engine's bookkeeping per sequence** (``Efficiency.host_per_seq_*_s``):
  scheduling, block tables, sampling metadata and output processing of every
  running sequence, in vLLM's V0 engine synchronous with the GPU, added per step.

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
    sms: int = 132
    """Streaming multiprocessors: a matmul runs in waves of one output tile per SM."""

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


HARDWARE: dict[str, Hardware] = {
    "H100-SXM": Hardware(),
    # NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e, NVLink 3 600 GB/s
    # both directions; one 200 Gb/s HDR NIC per GPU; PCIe Gen4 x16 (~25 GB/s effective).
    "A100-SXM4-80GB": Hardware(name="A100-SXM4-80GB", peak_flops=312e12,
                               hbm_bandwidth=2.039e12, hbm_bytes=80e9,
                               intra_node_bandwidth=300e9, inter_node_bandwidth=25e9,
                               host_bandwidth=25e9, sms=108),
}
"""Accelerators by name (``simulate.hardware`` in an experiment config)."""


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak FLOP/s (``mfu_*``) and of memory bandwidth
    (``bw_eff_*``) per phase, a fixed cost per call (``overhead_*_s``: kernel
    launches, the engine's host work) and the fraction of link bandwidth the
    collectives reach. Defaults are typical of vLLM/Megatron on H100 (matmuls at
    ~60% of peak, decode ~70% of HBM bandwidth); calibrate them for a real engine.

    ``mfu_*`` is the matmuls' efficiency alone: the elementwise kernels, launches and
    partial waves are priced separately (module doc), so training's matmuls (the
    backward's are the same cuBLAS kernels on transposed operands) get the same
    0.6 as inference's; the ~45% whole-model MFU Megatron reports is what is left
    after those and the pipeline bubbles."""

    mfu_prefill: float = 0.6
    bw_eff_prefill: float = 0.7
    mfu_decode: float = 0.5
    bw_eff_decode: float = 0.7
    mfu_infer: float = 0.6
    bw_eff_infer: float = 0.7
    mfu_train: float = 0.6
    bw_eff_train: float = 0.7
    overhead_prefill_s: float = 1e-3
    overhead_decode_s: float = 1e-3
    overhead_infer_s: float = 1e-3
    overhead_train_s: float = 1e-3
    comm_eff: float = 0.8
    # Host seconds per kernel launch: a pass takes at least (its kernels x this).
    # Decode replays a CUDA graph (vLLM's default): ~1.5 us a kernel node; eager
    # PyTorch (Megatron's training loop, with fused kernels) dispatches a kernel in
    # ~5 us. Both are below the GPU time of a 13B layer, so the floor binds only for
    # small models and small batches.
    launch_prefill_s: float = 5e-6
    launch_decode_s: float = 1.5e-6
    launch_infer_s: float = 5e-6
    launch_train_s: float = 5e-6
    # Engine bookkeeping per running sequence per call (added, not overlapped: V0
    # vLLM schedules, prepares inputs and processes outputs between GPU steps).
    # ~5 us a sequence for an engine that overlaps most of it (vLLM with async
    # output processing); training and inference handle tensors, not sequences.
    host_per_seq_prefill_s: float = 5e-6
    host_per_seq_decode_s: float = 5e-6
    host_per_seq_infer_s: float = 0.0
    host_per_seq_train_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Efficiency.{f.name} must be a finite number >= 0, got {v!r}")
            if not f.name.startswith(("overhead", "launch", "host")) and v <= 0:
                raise ValueError(f"Efficiency.{f.name} must be > 0, got {v!r}")

    def mfu(self, phase: str) -> float:
        return getattr(self, f"mfu_{_phase(phase)}")

    def bw_eff(self, phase: str) -> float:
        return getattr(self, f"bw_eff_{_phase(phase)}")

    def overhead_s(self, phase: str) -> float:
        return getattr(self, f"overhead_{_phase(phase)}_s")

    def launch_s(self, phase: str) -> float:
        return getattr(self, f"launch_{_phase(phase)}_s")

    def host_per_seq_s(self, phase: str) -> float:
        return getattr(self, f"host_per_seq_{_phase(phase)}_s")


def _phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")
    return phase


@dataclass(frozen=True)
class Work:
    """What one call does on one device: matmul FLOPs and the bytes they overlap
    with, link time, the bytes of memory-bound kernels between the matmuls, kernel
    launches, and sequences the engine tracks."""

    flops: float = 0.0
    bytes: float = 0.0
    comm_s: float = 0.0
    serial_bytes: float = 0.0
    """Bytes of elementwise/reduction kernels (norms, rotary, SwiGLU, residual adds,
    logits post-processing): each its own kernel, so not hidden under the FLOPs."""
    kernels: float = 0.0
    """Kernel launches (the host issues each one)."""
    seqs: float = 0.0
    """Sequences the engine schedules in this call (per-sequence host work)."""
    idle_flops: float = 0.0
    """FLOP slots the tensor cores leave idle in the matmuls' last, partial wave."""

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Work)))

    def scale(self, k: float) -> "Work":
        return Work(*(getattr(self, f.name) * k for f in fields(Work)))


@dataclass(frozen=True)
class KernelProfile:
    """Memory traffic and launches of the kernels between the matmuls, per decoder
    layer, by implementation. Traffic is in *passes*: reads plus writes of one
    element in the activation dtype (an fp32 intermediate counts 2)."""

    name: str
    norm_passes: float
    """Per hidden element, for both RMSNorms and residual adds of a layer."""
    rotary_passes: float
    """Per query/key element (rotary embedding)."""
    attn_io_passes: float
    """Per query/key/value element around the attention kernel (layout, (un)padding)."""
    mlp_passes: float
    """Per MLP-intermediate element (SwiGLU: activation and product)."""
    logits_passes: float
    """Per logit element after the head matmul (dtype casts, temperature, softmax)."""
    fused_projections: bool
    """q/k/v in one matmul and gate/up in one (else a matmul each)."""
    kernels_per_layer: float
    """Kernels a decoder layer's forward launches."""
    kernels_per_pass: float
    """Kernels outside the layers (embedding, final norm, head, loss or sampler)."""
    unshard_bytes_trained: float = 0.0
    """Bytes per parameter a trained model's pass moves to build its compute weights."""
    unshard_bytes_frozen: float = 0.0
    """The same for a frozen (reference, reward) model."""
    grad_reduce_bytes: float = 0.0
    """Bytes per parameter a backward moves to reduce and accumulate the gradients."""

    def projections(self, h: int, q: int, kv: int, i: int) -> list[tuple[int, int]]:
        """(output width, weights) of each matmul of a layer on one rank."""
        if self.fused_projections:
            return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


FUSED_KERNELS = KernelProfile(
    # vLLM / Megatron with fused kernels: add+RMSNorm reads x and the residual and
    # writes both (4 passes a norm, 2 norms); rotary in place (read + write); the
    # attention kernel reads q, k, v and writes o; SwiGLU reads gate and up, writes one
    # (3 passes of i); the logits written in fp32 and read once by the fused
    # softmax/sampler or cross entropy (2 x 2). Launches: norm, qkv, rotary, cache
    # write, attention, o, norm, gate_up, act, down, plus ~2 bookkeeping kernels.
    "fused", norm_passes=8, rotary_passes=2, attn_io_passes=2, mlp_passes=3,
    logits_passes=4, fused_projections=True, kernels_per_layer=12, kernels_per_pass=10)

HF_EAGER_KERNELS = KernelProfile(
    # transformers' eager Llama/Qwen2 modules (verl's FSDP workers; flash-attn 2 for
    # attention only). RMSNorm: to(fp32) r1 w2, pow r2 w2, mean r2, mul r2 w2,
    # to(bf16) r2 w1, *weight r1 w1 -> 18 passes, two norms 36, two residual adds 3
    # each -> 42. Rotary per element: *cos r1 w1, rotate_half (slice, neg, cat) ~r2 w2,
    # *sin r1 w1, add r2 w1 -> ~11. FA2 with a padding mask: unpad q,k,v (gather r1
    # w1), repad o, transposes -> ~4. MLP: act r1 w1, *up r2 w1 -> 5. Logits (bf16:
    # transformers >= 4.45 upcasts only with labels; the matmul's write is counted
    # with it): verl's in-place /temperature on every position r1 w1; on the response
    # positions (a third of a 1024 + 512 padded row) a contiguous copy r1 w1, the
    # log-prob (flash-attn's cross entropy) r1 and the entropy (softmax r1 w1,
    # logsumexp r1, sum(p * logits) r2 w1) -> 2 + 10/3 ~ 6 per position. Launches:
    # ~7 per norm, 3 q/k/v (+bias), ~12 rotary, ~10 around FA2, o, gate, up, act, mul,
    # down, 2 adds -> ~47, and FSDP's unshard/free around each wrapped layer ~3 -> 50.
    # FSDP (verl: FULL_SHARD, one wrapped unit per layer, fp32 master weights of the
    # trained models, bf16 compute): every forward all-gathers each unit (a copy on one
    # rank, r4 w4) and casts it to bf16 (r4 w2) -> 14 bytes a parameter; a frozen bf16
    # model only copies (r2 w2) -> 4. A backward gathers again (14) and reduces the
    # bf16 gradient: cast to fp32 (r2 w4), reduce-scatter (a copy, r4 w4), accumulate
    # into the sharded .grad (r4 r4 w4) -> 26 more.
    "hf-eager", norm_passes=42, rotary_passes=11, attn_io_passes=4, mlp_passes=5,
    logits_passes=6, fused_projections=False, kernels_per_layer=50, kernels_per_pass=30,
    unshard_bytes_trained=14, unshard_bytes_frozen=4, grad_reduce_bytes=26)

VLLM_V0_KERNELS = replace(
    # vLLM 0.6 (V0) decoding with `logprobs=1`, as verl's rollout asks: the layers
    # are FUSED_KERNELS', the sampler runs eagerly on the whole (batch, vocab) logits:
    # .float() r1 w2, /temperature r2 w2, softmax r2 w2, log_softmax r2 w2, the
    # exponential race (q w2, probs / q r4 w2, argmax r2), the sampled token's log-prob
    # and its rank (gather, top-1 r2) -> ~28 passes; ~30 kernels with the logits
    # processor, embedding and final norm.
    FUSED_KERNELS, name="vllm-v0-logprobs", logits_passes=28, kernels_per_pass=30)

KERNEL_PROFILES = {k.name: k for k in (FUSED_KERNELS, HF_EAGER_KERNELS, VLLM_V0_KERNELS)}


class Roofline:
    """Roofline times of ``model`` calls on ``hardware`` (see the module doc).

    ``dtype_bytes``: 2 for bf16 weights/activations/KV (the GPU setting), 4 for the
    float32 CPU engine. ``recompute``: full activation recomputation in training
    (one more forward in the backward, activations of a layer's input only).
    ``kernels``: the implementation of inference and training passes,
    ``gen_kernels`` of the generation engine's (:class:`KernelProfile`).
    """

    def __init__(self, model: ModelConfig, hardware: Hardware = Hardware(),
                 efficiency: Efficiency = Efficiency(), dtype_bytes: int = 2,
                 recompute: bool = False, kernels: KernelProfile = FUSED_KERNELS,
                 gen_kernels: KernelProfile = FUSED_KERNELS):
        if dtype_bytes not in (1, 2, 4):
            raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {dtype_bytes}")
        self.model, self.hw, self.eff = model, hardware, efficiency
        self.dtype_bytes, self.recompute = dtype_bytes, recompute
        self.kernels, self.gen_kernels = kernels, gen_kernels

    def with_efficiency(self, efficiency: Efficiency) -> "Roofline":
        return Roofline(self.model, self.hw, efficiency, self.dtype_bytes, self.recompute,
                        self.kernels, self.gen_kernels)

    def with_recompute(self, recompute: bool) -> "Roofline":
        return Roofline(self.model, self.hw, self.eff, self.dtype_bytes, recompute,
                        self.kernels, self.gen_kernels)

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
        if head == "lm" and m.tie_word_embeddings and layout.pp == 1:
            head_p = 0.0  # one matrix serves as embedding and LM head
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
                    kv_read_tokens: float = 0.0, kv_write_tokens: float = 0.0,
                    kernels: KernelProfile | None = None) -> Work:
        """Forward of ``layers`` decoder layers over ``tokens`` tokens on one tp rank.

        ``bytes``: weights, each matmul's input read and output written (column-
        parallel q/k/v and gate/up read all of ``h``, row-parallel o and down write all
        of it), KV reads and writes -- the traffic the matmuls and the attention
        kernel overlap with their FLOPs. ``serial_bytes``: the other kernels'
        (``kernels``, default the inference/training profile)."""
        m, d = self.model, self.dtype_bytes
        k = kernels or self.kernels
        h, q, i = m.hidden_size, m.q_size, m.intermediate_size
        kvl = self.kv_local(tp)
        linear = 2 * (h * q / tp + 2 * h * kvl + q * h / tp + 3 * h * i / tp) * tokens
        attn = 4 * q / tp * attn_pairs
        weight_bytes = self.layer_params(tp) * d
        gemm_io = d * (4 * h + (2 * q + 3 * i) / tp + 2 * kvl) * tokens
        kv_bytes = 2 * kvl * d * (kv_read_tokens + kv_write_tokens)
        serial = d * tokens * (k.norm_passes * h + k.rotary_passes * (q / tp + kvl)
                               + k.attn_io_passes * (q / tp + 2 * kvl) + k.mlp_passes * i / tp)
        comm = 2 * self._allreduce_s(tokens * h * d, tp, tp)
        idle = sum(self._idle_flops(tokens, n, kdim) for n, kdim in
                   k.projections(h, q // tp, kvl, i // tp))
        return Work(linear + attn, weight_bytes + gemm_io + kv_bytes, comm, serial,
                    k.kernels_per_layer, idle_flops=idle).scale(layers)

    TILE = 128
    """Output tile of a bf16 matmul (cuBLAS/CUTLASS on Ampere and Hopper: 128x128)."""

    def _idle_flops(self, rows: float, cols: float, inner: float) -> float:
        """FLOP slots a ``rows x inner @ inner x cols`` matmul leaves idle in its last
        wave. A matmul runs one output tile per SM at a time, in waves; the last wave
        of a matmul with more tiles than SMs is partial and takes a full wave's time
        (wave quantization, NVIDIA's matrix-multiplication performance guide). One
        with fewer tiles than SMs is split along ``inner`` (split-K) by the library's
        heuristics to fill the GPU, so it loses nothing here."""
        t = self.TILE
        tiles = math.ceil(rows / t) * math.ceil(cols / t)
        if tiles <= self.hw.sms:
            return 0.0
        executed = math.ceil(tiles / self.hw.sms) * self.hw.sms * t * t * 2 * inner
        return max(0.0, executed - 2 * rows * cols * inner)

    def head_work(self, tokens: float, tp: int, head: str,
                  kernels: KernelProfile | None = None) -> Work:
        """Final norm and head over ``tokens`` tokens (LM head: vocab-parallel logits,
        written in the activation dtype, then post-processed by ``kernels``)."""
        m, d = self.model, self.dtype_bytes
        k = kernels or self.kernels
        if head == "value":
            return Work(2 * m.hidden_size * tokens, d * m.hidden_size * (2 * tokens + 1),
                        kernels=k.kernels_per_pass)
        v_local = m.vocab_size / tp
        return Work(2 * m.hidden_size * v_local * tokens,
                    d * m.hidden_size * (v_local + tokens) + d * v_local * tokens,
                    serial_bytes=k.logits_passes * d * v_local * tokens,
                    kernels=k.kernels_per_pass,
                    idle_flops=self._idle_flops(tokens, v_local, m.hidden_size))

    def device_s(self, work: Work, phase: str) -> float:
        """Device time of ``work``: the matmuls' roofline (compute or memory bound),
        the memory-bound kernels after it, the links."""
        bw = self.hw.hbm_bandwidth * self.eff.bw_eff(phase)
        compute = (work.flops + work.idle_flops) / (self.hw.peak_flops * self.eff.mfu(phase))
        return max(compute, work.bytes / bw) + work.serial_bytes / bw + work.comm_s

    def time_s(self, work: Work, phase: str) -> float:
        """Time of ``work`` in ``phase``: the device time, or the host's kernel
        launches if those take longer (the GPU waits for work it is not given yet),
        plus the engine's per-sequence bookkeeping and the per-call overhead."""
        launch = work.kernels * self.eff.launch_s(phase)
        return (max(self.device_s(work, phase), launch)
                + work.seqs * self.eff.host_per_seq_s(phase) + self.eff.overhead_s(phase))

    def host_bound(self, work: Work, phase: str) -> bool:
        """Whether the host's kernel launches, not the device, set ``work``'s time."""
        return work.kernels * self.eff.launch_s(phase) > self.device_s(work, phase)

    def bound(self, work: Work, phase: str) -> str:
        """``"compute"`` or ``"memory"``: which roof limits ``work``."""
        compute = (work.flops + work.idle_flops) / (self.hw.peak_flops * self.eff.mfu(phase))
        memory = (work.bytes + work.serial_bytes) / (self.hw.hbm_bandwidth * self.eff.bw_eff(phase))
        return "compute" if compute >= memory else "memory"

    def _p2p_s(self, nbytes: float, layout: ParallelLayout) -> float:
        """One pipeline hop: stage ranks are ``tp*dp`` devices apart."""
        bw = self.hw.link_bandwidth(layout.tp * layout.dp + 1) * self.eff.comm_eff
        return nbytes / bw + self.hw.collective_latency_s

    def _stage_layers(self, layout: ParallelLayout) -> list[int]:
        """Layers per stage: ``numpy.array_split`` sizes (docs/design.md sharding contract)."""
        return [len(a) for a in np.array_split(np.arange(self.model.num_layers), layout.pp)]

    # -- calls -------------------------------------------------------------------------------

    def stage_params(self, layout: ParallelLayout, head: str) -> list[float]:
        """Parameters each pipeline stage holds on one device (embedding on the first,
        final norm and head on the last; a tied LM head is the embedding)."""
        m = self.model
        emb = m.vocab_size * m.hidden_size / layout.tp
        head_p = (0.0 if m.tie_word_embeddings and layout.pp == 1 else emb) if head == "lm" \
            else m.hidden_size
        stages = self._stage_layers(layout)
        out = [n * self.layer_params(layout.tp) for n in stages]
        out[0] += emb
        out[-1] += head_p + m.hidden_size
        return out

    def unshard_work(self, layout: ParallelLayout, head: str, per_param: float) -> list[Work]:
        """Per stage: the framework's traffic of ``per_param`` bytes a parameter
        (:class:`KernelProfile`'s unshard/gradient terms), separate copy kernels."""
        return [Work(serial_bytes=p * per_param) for p in self.stage_params(layout, head)]

    def pass_work(self, layout: ParallelLayout, tokens: float, attn_pairs: float,
                  head_tokens: float, head: str, kv_read_tokens: float = 0.0,
                  kv_write_tokens: float = 0.0, gen: bool = False, seqs: float = 0.0,
                  frozen: bool = False) -> list[Work]:
        """Per-stage work of one forward pass (embedding lookup on stage 0 is a gather);
        ``gen``: a generation engine's pass (its kernel profile), ``seqs`` sequences
        scheduled (counted on the first stage); ``frozen``: a model that is not
        trained (its weights need no master copy cast)."""
        out = []
        k = self.gen_kernels if gen else self.kernels
        unshard = 0.0 if gen else (k.unshard_bytes_frozen if frozen else k.unshard_bytes_trained)
        stages = self._stage_layers(layout)
        params = self.unshard_work(layout, head, unshard)
        for s, n in enumerate(stages):
            w = self.layers_work(n, tokens, attn_pairs, layout.tp, kv_read_tokens,
                                 kv_write_tokens, k) + params[s]
            if s == 0:
                w = w + Work(0.0, self.dtype_bytes * self.model.hidden_size * tokens, seqs=seqs)
            if s == len(stages) - 1:
                w = w + self.head_work(head_tokens, layout.tp, head, k)
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
                              kv_write_tokens=batch * prompt_len, gen=True, seqs=batch)

    def decode_works(self, batch: int, context_tokens: float,
                     layout: ParallelLayout = ParallelLayout()) -> list[Work]:
        """One decode step of ``batch`` sequences holding ``context_tokens`` in all."""
        return self.pass_work(layout, batch, context_tokens, batch, "lm",
                              kv_read_tokens=context_tokens, kv_write_tokens=batch, gen=True,
                              seqs=batch)

    def forward_works(self, batch: int, seq_len: float,
                      layout: ParallelLayout = ParallelLayout(), head: str = "lm",
                      attn_len: float | None = None, frozen: bool = False) -> list[Work]:
        """Inference forward of ``batch`` sequences of ``seq_len`` tokens (padding
        included) with every token's output. ``attn_len``: the real length the
        attention kernel sees (flash-attention skips padding; default ``seq_len``);
        ``frozen``: the reference or reward model."""
        tokens = batch * seq_len
        a = seq_len if attn_len is None else min(attn_len, seq_len)
        return self.pass_work(layout, tokens, batch * a * (a + 1) / 2, tokens, head,
                              frozen=frozen)

    def train_works(self, micro_batch: int, seq_len: float,
                    layout: ParallelLayout = ParallelLayout(), head: str = "lm",
                    attn_len: float | None = None) -> tuple[list[Work], list[Work]]:
        """Per-stage (forward, backward) work of one training micro-batch.

        Backward = 2x the forward's FLOPs, bytes, elementwise traffic and launches
        (weight and input gradients, Narayanan et al. SC'21; an elementwise backward
        reads the output gradient and the saved input and writes one gradient), plus
        one forward with recomputation; its tp all-reduces as many as the forward's."""
        fwd = self.forward_works(micro_batch, seq_len, layout, head, attn_len)
        back = 3.0 if self.recompute else 2.0
        k = self.kernels
        # The framework's weight traffic is per pass, not per FLOP: the backward gathers
        # the weights again (once more with recomputation) and reduces the gradients.
        unshard = self.unshard_work(layout, head, k.unshard_bytes_trained)
        extra = self.unshard_work(layout, head, (back - 2.0) * k.unshard_bytes_trained
                                  + k.unshard_bytes_trained + k.grad_reduce_bytes)
        bwd = []
        for w, u, e in zip(fwd, unshard, extra):
            body = replace(w, serial_bytes=w.serial_bytes - u.serial_bytes)
            bwd.append(replace(body.scale(back), comm_s=w.comm_s * (back - 1), seqs=0.0) + e)
        return fwd, bwd

    def prefill_s(self, batch: int, prompt_len: int, layout: ParallelLayout = ParallelLayout(),
                  head: str = "lm") -> float:
        return self._serial_s(self.prefill_works(batch, prompt_len, layout, head), "prefill")

    def decode_step_s(self, batch: int, context_tokens: float,
                      layout: ParallelLayout = ParallelLayout()) -> float:
        if batch <= 0:
            return 0.0
        return self._serial_s(self.decode_works(batch, context_tokens, layout), "decode")

    def forward_s(self, batch: int, seq_len: float, layout: ParallelLayout = ParallelLayout(),
                  head: str = "lm", attn_len: float | None = None, frozen: bool = False) -> float:
        return self._serial_s(self.forward_works(batch, seq_len, layout, head, attn_len, frozen),
                              "infer")

    def train_stage_s(self, micro_batch: int, seq_len: float, layout: ParallelLayout,
                      head: str = "lm", attn_len: float | None = None
                      ) -> tuple[list[float], list[float]]:
        """Per-stage (forward, backward) seconds of one training micro-batch."""
        fwd, bwd = self.train_works(micro_batch, seq_len, layout, head, attn_len)
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
    measured/predicted ratio. A calibrated phase's launch floor and per-sequence
    host term are set to 0: the fitted ``c`` and ``r`` carry what the host adds.
    Phases without points keep their factors.
    """
    changes: dict[str, float] = {}
    for phase in PHASES:
        pts = [p for p in points if p.phase == phase]
        if not pts:
            continue
        base = roofline.with_efficiency(efficiency)
        pure = np.array([base.device_s(p.work, phase) - p.work.comm_s for p in pts])
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
        changes[f"launch_{phase}_s"] = 0.0
        changes[f"host_per_seq_{phase}_s"] = 0.0
    return replace(efficiency, **changes)
