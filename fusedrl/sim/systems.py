"""The RLHF systems the simulator can stand for: their software, not their hardware.

The roofline (:mod:`.roofline`) prices FLOPs and bytes; how many of those a system
moves, and how much host time it adds, depends on its software: fused kernels or
transformers' eager modules, CUDA graphs or eager decode, padding, recomputation,
which forwards run after generation. A :class:`SystemProfile` names those choices
so that ``fusedrl simulate`` can check the cost model against a published run of a
real system (issue 18: ``configs/verl-gsm8k-qwen05b.yaml``) and then simulate
RLHFuse's setting with RLHFuse's software (``configs/rlhfuse-*.yaml``).

Every number here is a property of the software, argued in its comment from how
the software works; none is fitted to a published stage time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from fusedrl.models.config import ModelConfig
from fusedrl.sim.overheads import RuntimeOverheads
from fusedrl.sim.roofline import (FUSED_KERNELS, HF_EAGER_KERNELS, VLLM_V0_KERNELS, Efficiency,
                                  Hardware, KernelProfile)


@dataclass(frozen=True)
class SystemProfile:
    """The software of an RLHF system, as the simulator sees it."""

    name: str
    kernels: KernelProfile = FUSED_KERNELS
    """Implementation of the inference and training passes."""
    gen_kernels: KernelProfile = FUSED_KERNELS
    """Implementation of the generation engine's passes."""
    efficiency: dict[str, float] = field(default_factory=dict)
    """:class:`~fusedrl.sim.roofline.Efficiency` fields that differ from the defaults."""
    padding: str = "micro_batch"
    """How inference/training batches are padded (:data:`fusedrl.sim.iteration.PADDING`)."""
    actor_recompute: bool = False
    """Activation recomputation (gradient checkpointing) in the actor's training."""
    critic_recompute: bool = False
    """The same for the critic."""
    infer_models: tuple[str, ...] = ("ref", "reward", "values")
    """Forwards after generation (:data:`fusedrl.sim.iteration.INFER_MODELS`)."""
    old_log_prob_in_gen: bool = False
    """The generation stage's timer holds the actor's old-log-prob forward."""
    sync_per_tensor_s: float = 0.0
    """Generation stage: host seconds per weight tensor handed to the engine."""
    sync_bytes_per_param: float = 0.0
    """Generation stage: device bytes per parameter of that hand-over."""

    def efficiency_for(self, base: Efficiency = Efficiency()) -> Efficiency:
        return replace(base, **self.efficiency)

    def weight_sync_s(self, model: ModelConfig, hardware: Hardware) -> float:
        """Seconds the generation stage spends handing the trained weights to the
        engine: per tensor (9 a layer: q, k, v, o, gate, up, down, two norms; the
        embedding, final norm, an untied head) and per byte at HBM bandwidth."""
        tensors = 9 * model.num_layers + 2 + (0 if model.tie_word_embeddings else 1)
        return (tensors * self.sync_per_tensor_s
                + model.num_params() * self.sync_bytes_per_param / hardware.hbm_bandwidth)

    def overheads(self, model: ModelConfig, hardware: Hardware) -> RuntimeOverheads:
        """The runtime terms this system adds (:class:`RuntimeOverheads`)."""
        return RuntimeOverheads(gen_call_s=self.weight_sync_s(model, hardware))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kernels"], out["gen_kernels"] = self.kernels.name, self.gen_kernels.name
        out["infer_models"] = list(self.infer_models)
        return out


RLHFUSE = SystemProfile(
    # RLHFuse (arXiv 2409.13221 §6): its own generation engine (continuous batching,
    # CUDA graphs) and Megatron-style training with fused kernels; each micro-batch
    # padded to its longest sample (the configs use one sample per micro-batch);
    # reference, reward and critic forwards after generation, the old log-probs taken
    # from generation. The roofline's default efficiencies.
    "rlhfuse")

VERL_2024 = SystemProfile(
    # verl as released in late 2024 (ppo_trainer.yaml defaults, the GSM8K quickstart),
    # one GPU, FSDP workers on transformers models, vLLM 0.6.3 (V0 engine) rollout.
    "verl-2024",
    # FSDP workers run transformers' Qwen2 modules eagerly (flash-attn 2 only for
    # attention): unfused fp32 RMSNorm, rotary, SwiGLU, logits post-processing.
    kernels=HF_EAGER_KERNELS,
    # vLLM has fused kernels (add+RMSNorm, rotary, SiLU-and-mul), its sampler works on
    # fp32 logits of the whole vocabulary (verl asks for `logprobs=1`)...
    gen_kernels=VLLM_V0_KERNELS,
    efficiency={
        # ... but verl sets `enforce_eager: True` (no CUDA graphs; the graphs would
        # have to be recaptured after each weight sync): each of a decode step's
        # ~300 kernels (24 layers x 12) is a Python module call into a PyTorch op,
        # ~10 us each, so a step takes >= 3 ms whatever the batch.
        "launch_decode_s": 10e-6,
        "launch_prefill_s": 10e-6,
        # V0's engine loop is synchronous with the GPU: per running sequence and step
        # it schedules (block tables), builds the model input and sampling metadata,
        # and turns the sampled token into Python objects; verl asks for `logprobs=1`,
        # so the sampler also builds a log-prob dict per sequence. ~50 us a sequence
        # (V0's CPU overhead dominated small models; vLLM's V1 rewrite targets it).
        "host_per_seq_decode_s": 50e-6,
        "host_per_seq_prefill_s": 50e-6,
        # transformers' eager modules: ~8 us per kernel from Python (module call,
        # autocast, dispatch); the backward's kernels come from autograd's C++ engine,
        # so a training pass (forward + 2x backward kernels) averages ~6 us.
        "launch_infer_s": 8e-6,
        "launch_train_s": 6e-6,
    },
    # No `use_remove_padding` then: the dataset left-pads every prompt to
    # `max_prompt_length`, the rollout right-pads every response to
    # `max_response_length`, and every forward and backward runs on the padded
    # (B, prompt + response) tensor (flash-attn skips padding in attention only).
    padding="max",
    # `enable_gradient_checkpointing` defaults to False for the actor and the critic,
    # and the GSM8K quickstart command does not set it.
    actor_recompute=False, critic_recompute=False,
    # GSM8K's reward is a rule (no reward model); the hybrid engine recomputes the old
    # log-probs after vLLM, inside `generate_sequences`, so inside the `gen` timer
    # (verl moved it to its own `old_log_prob` timer in 2025).
    infer_models=("old_log_prob", "ref", "values"), old_log_prob_in_gen=True,
    # The `gen` timer also holds the hybrid engine's weight hand-over: FSDP's sharded
    # state dict (a DTensor per parameter) loaded tensor by tensor by vLLM's weight
    # loaders, ~1 ms of Python a tensor, and the fp32 -> bf16 copy (r4 w2).
    sync_per_tensor_s=1e-3, sync_bytes_per_param=6.0)

SYSTEMS: dict[str, SystemProfile] = {s.name: s for s in (RLHFUSE, VERL_2024)}
"""Systems by name (``simulate.system`` in an experiment config)."""
