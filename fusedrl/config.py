"""Experiment configuration: dataclasses with a docstring per field, validated in
``__post_init__``. A YAML file only gives values for them; ``--set a.b=v`` overrides any
field. Unknown keys and wrong types are a :class:`ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusedrl.roles import Role as _Role

# dtypes of AdamW's moments (``ppo.optimizer_state_dtype``; fusedrl.optim builds each)
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """Bad configuration; the message names the key (or file) and the problem."""


def _require(cond: bool, key: str, value: Any, problem: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}={value!r}: {problem}")


@dataclass
class ModelSection:
    """Which networks the four PPO roles start from."""

    path: str = ""
    """Actor (and reference) checkpoint: a Hugging Face safetensors directory, a .gguf
    file, or ``pkg:NAME`` for a model shipped in a Python package. Empty: train from
    scratch with ``preset``."""
    preset: str = "tiny"
    """Shape of a from-scratch model (``fusedrl.models.PRESETS``)."""
    vocab_size: int = 0
    """From scratch only: vocabulary size; 0 takes the tokenizer's."""
    critic_path: str = ""
    """Critic initialisation; empty uses the actor's (a zero value head is added)."""
    dtype: str = "float32"
    """Parameter dtype of the trained models (actor, critic) and their inference copies:
    float32 or bfloat16."""
    frozen_dtype: str = "bfloat16"
    """Parameter dtype of the frozen models (reference policy, reward model): float32 or
    bfloat16. bfloat16 halves their memory; their log-probs/scores are still taken in
    float32 from the logits, as a bf16 reference does in verl."""
    frozen_compute_dtype: str = "auto"
    """The dtype the frozen models compute in: ``auto`` (float32 for bfloat16 weights on a
    CPU without bf16 matrix instructions, where a bf16 matmul is ~5x slower; else
    ``frozen_dtype``), float32 or bfloat16. float32 from bf16 weights converts one
    module's weights at a time, so memory stays that of ``frozen_dtype``."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of
    keeping them (actor and critic training): less activation memory for about one
    more forward per micro-batch."""

    def __post_init__(self) -> None:
        from fusedrl.models.config import PRESETS

        _require(self.path != "" or self.preset in PRESETS, "model.preset", self.preset,
                 f"unknown preset; known: {sorted(PRESETS)}")
        _require(self.dtype in ("float32", "bfloat16"), "model.dtype", self.dtype,
                 "must be float32 or bfloat16")
        _require(self.frozen_dtype in ("float32", "bfloat16"), "model.frozen_dtype",
                 self.frozen_dtype, "must be float32 or bfloat16")
        _require(self.frozen_compute_dtype in ("auto", "float32", "bfloat16"),
                 "model.frozen_compute_dtype", self.frozen_compute_dtype,
                 "must be auto, float32 or bfloat16")
        _require(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0")


@dataclass
class DataSection:
    """Where prompts come from."""

    task: str = "repeat"
    """Built-in task (``repeat``, ``arithmetic``) or ``file`` to read ``path``."""
    path: str = ""
    """Prompt file (.jsonl or .parquet) when ``task: file``."""
    prompt_key: str = "prompt"
    """Key of the prompt in each record (dots for nested keys)."""
    label_key: str = "label"
    """Key of the optional label/ground truth passed to rule rewards."""
    chat_template: bool = False
    """Render prompts with the tokenizer's chat template."""
    num_prompts: int = 4096
    """Number of prompts a built-in task generates."""
    max_prompt_len: int = 128
    """Prompts longer than this many tokens are an error."""
    val_path: str = ""
    """Validation prompts (.jsonl or .parquet, the same keys as ``path``); empty: a
    built-in task's held-out split of ``val_size`` prompts (drawn with another seed)."""
    val_size: int = 64
    """Held-out prompts of a built-in task for validation (``trainer.val_every``)."""

    def __post_init__(self) -> None:
        from fusedrl.data.builtin import TASKS

        _require(self.task == "file" or self.task in TASKS, "data.task", self.task,
                 f"unknown task; known: {sorted(TASKS)} or 'file'")
        _require(self.task != "file" or self.path != "", "data.path", self.path,
                 "data.task is 'file' but no path is given")
        _require(self.num_prompts >= 1, "data.num_prompts", self.num_prompts, "must be >= 1")
        _require(self.max_prompt_len >= 1, "data.max_prompt_len", self.max_prompt_len,
                 "must be >= 1")
        _require(self.val_size >= 1, "data.val_size", self.val_size, "must be >= 1")


@dataclass
class OverlongBufferSection:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13, §3.4; verl's
    ``reward_model.overlong_buffer``): a response longer than ``generation.max_new_tokens
    - len`` loses up to ``penalty_factor`` of score, linearly over the last ``len``
    tokens (:func:`fusedrl.algorithms.ppo.overlong_penalty`)."""

    enable: bool = False
    """Add the penalty to every response's score (before advantages and the
    dynamic-sampling filter); ``reward/overlong_penalty/mean`` is logged."""
    len: int = 4
    """Buffer length ``L_cache`` in tokens: 1..``generation.max_new_tokens``."""
    penalty_factor: float = 1.0
    """Penalty of a response that reaches ``generation.max_new_tokens``."""

    def __post_init__(self) -> None:
        _require(self.len >= 1, "reward.overlong_buffer.len", self.len, "must be >= 1")
        _require(self.penalty_factor >= 0, "reward.overlong_buffer.penalty_factor",
                 self.penalty_factor, "must be >= 0")


@dataclass
class RewardSection:
    """How a finished sample is scored."""

    type: str = "rule"
    """``rule`` (a Python function) or ``model`` (a reward model's value head)."""
    function: str = ""
    """Rule reward as ``module:function(prompt, response, label) -> float``; empty uses
    the built-in task's reward."""
    model_path: str = ""
    """Reward model checkpoint when ``type: model``."""
    overlong_buffer: OverlongBufferSection = field(default_factory=OverlongBufferSection)
    """DAPO's overlong penalty (off by default)."""

    def __post_init__(self) -> None:
        _require(self.type in ("rule", "model"), "reward.type", self.type,
                 "must be 'rule' or 'model'")
        _require(self.type != "model" or self.model_path != "", "reward.model_path",
                 self.model_path, "reward.type is 'model' but no model_path is given")


@dataclass
class GenerationSection:
    """Rollout sampling."""

    max_new_tokens: int = 16
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (also applied to the trainer's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k truncation; 0 disables it."""
    max_batch_size: int = 64
    """Decode slots of the engine (continuous batching)."""
    backend: str = "native"
    """Generation backend: a name in ``fusedrl.generation.backend.available_backends()``
    (``native``, ``vllm``; build it with ``make_backend``)."""
    packed_weights_gib: float = 3.0
    """Native engine on CPU: memory (GiB) for weights repacked in MKL's GEMM format,
    which decodes 1.3-1.7x faster on weights that do not fit in cache but takes ~3.5x
    their size and is rebuilt after each weight update (``generation/fastpath.py``);
    0 turns packing off."""
    forced_lengths: str = ""
    """Benchmark mode (as vLLM's benchmarks): force each sample's output length, ignoring
    EOS, from ``lognormal:MEDIAN,P99``, ``uniform:LO,HI``, ``fixed:L`` or a file with one
    integer per line (``fusedrl.generation.lengths``); capped at ``max_new_tokens``.
    Empty: samples stop at EOS."""
    def __post_init__(self) -> None:
        if self.forced_lengths:
            from fusedrl.generation.lengths import forced_lengths

            try:
                forced_lengths(self.forced_lengths, 1)
            except ValueError as e:
                raise ConfigError(f"config key generation.forced_lengths: {e}") from None
        _require(self.max_new_tokens >= 1, "generation.max_new_tokens", self.max_new_tokens,
                 "must be >= 1")
        _require(self.temperature > 0, "generation.temperature", self.temperature,
                 "must be > 0 for PPO (sampling)")
        _require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k >= 0, "generation.top_k", self.top_k, "must be >= 0")
        _require(self.packed_weights_gib >= 0, "generation.packed_weights_gib",
                 self.packed_weights_gib, "must be >= 0")
        _require(self.max_batch_size >= 1, "generation.max_batch_size", self.max_batch_size,
                 "must be >= 1")
        if self.backend != "native":  # the registry imports torch: only when needed
            from fusedrl.generation.backend import available_backends

            known = available_backends()
            _require(self.backend in known, "generation.backend", self.backend,
                     f"known backends: {', '.join(known)}")


@dataclass
class PPOSection:
    """PPO hyper-parameters (names as in verl/OpenRLHF where they exist)."""

    rollout_batch_size: int = 64
    """Prompts per iteration."""
    ppo_epochs: int = 1
    """Passes over the rollout batch per iteration."""
    mini_batch_size: int = 32
    """Samples per optimizer step (must divide ``rollout_batch_size x actor.rollout_n``)."""
    micro_batch_size: int = 16
    """Samples per forward/backward (gradient accumulation inside a mini-batch)."""
    micro_batch_tokens: int = -1
    """Token budget of a training micro-batch, verl's ``ppo_max_token_len_per_gpu``: the
    mini-batch's samples sorted by length and grouped into micro-batches whose forward
    computes at most this many tokens (packed rows x row width with ``ppo.packed``,
    else rows x longest row). -1 (default): ``micro_batch_size`` x the batch's longest
    sequence, what a micro-batch of ``micro_batch_size`` samples may take on that batch
    (the same micro-batches on a batch of equal lengths, more samples per micro-batch
    where they are shorter); 0: off (``micro_batch_size`` samples each). The loss is
    unchanged: each micro-batch is weighted by its share of the mini-batch's tokens or
    samples (``actor.loss_agg_mode``)."""
    infer_micro_batch_tokens: int = -1
    """Token budget of an inference micro-batch (old/reference log-probs, values,
    scores), as ``micro_batch_tokens`` over the whole batch (-1: the same default;
    0: off, ``micro_batch_size`` samples)."""
    packed: bool = True
    """Packed sequences (:mod:`fusedrl.packing`): a micro-batch's samples are laid
    end to end into rows as long as its longest sample (first-fit decreasing), each
    attending only within itself with positions restarting per sample, so inference
    and training compute almost no padding; outputs equal the padded ones up to float
    summation order. false: right-padded rows."""
    actor_lr: float = 1e-6
    """AdamW learning rate of the actor."""
    critic_lr: float = 1e-5
    """AdamW learning rate of the critic."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer_state_dtype: str = "float32"
    """dtype of AdamW's two moments: float32 (``torch.optim.AdamW``) or bfloat16 (stored
    with stochastic rounding, :mod:`fusedrl.optim`): 4 instead of 8 bytes of optimizer
    state per trained parameter, the update still computed in float32."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    clip_ratio: float = 0.2
    """PPO policy ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip range."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient (reward shaping against the reference)."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: k1, abs, mse, low_var_kl."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = 0.1
    """Target KL of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    def __post_init__(self) -> None:
        for key in ("rollout_batch_size", "ppo_epochs", "mini_batch_size", "micro_batch_size"):
            v = getattr(self, key)
            _require(v >= 1, f"ppo.{key}", v, "must be >= 1")
        for key in ("micro_batch_tokens", "infer_micro_batch_tokens"):
            _require(getattr(self, key) >= -1, f"ppo.{key}", getattr(self, key),
                     "must be >= -1 (-1: default, 0: off)")
        _require(self.mini_batch_size % self.micro_batch_size == 0, "ppo.micro_batch_size",
                 self.micro_batch_size, f"must divide ppo.mini_batch_size={self.mini_batch_size}")
        for key in ("actor_lr", "critic_lr"):
            _require(getattr(self, key) > 0, f"ppo.{key}", getattr(self, key), "must be > 0")
        for key in ("gamma", "lam"):
            _require(0 <= getattr(self, key) <= 1, f"ppo.{key}", getattr(self, key),
                     "must be in [0, 1]")
        _require(self.kl_estimator in ("k1", "abs", "mse", "low_var_kl"), "ppo.kl_estimator",
                 self.kl_estimator, "must be k1, abs, mse or low_var_kl")
        _require(self.clip_ratio > 0, "ppo.clip_ratio", self.clip_ratio, "must be > 0")
        _require(self.kl_coef >= 0, "ppo.kl_coef", self.kl_coef, "must be >= 0")
        _require(self.weight_decay >= 0, "ppo.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.optimizer_state_dtype in OPTIMIZER_STATE_DTYPES,
                 "ppo.optimizer_state_dtype", self.optimizer_state_dtype,
                 f"must be one of {', '.join(OPTIMIZER_STATE_DTYPES)}")


@dataclass
class FilterGroupsSection:
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11, §3.2; verl's
    ``algorithm.filter_groups``): groups whose responses all score the same give no
    group-relative gradient; they are dropped and more prompts are generated until the
    batch is full (``fusedrl/dapo.py``). Metrics ``filter_groups/*``."""

    enable: bool = False
    """Drop equal-score groups and refill the batch (not with partial rollouts)."""
    max_num_gen_batches: int = 10
    """Most generation rounds per iteration, the first included (verl's name). At the
    cap the iteration trains on the groups kept so far (``filter_groups/short``: 1),
    where verl raises."""

    def __post_init__(self) -> None:
        _require(self.max_num_gen_batches >= 1, "algorithm.filter_groups.max_num_gen_batches",
                 self.max_num_gen_batches, "must be >= 1")


@dataclass
class AlgorithmSection:
    """Which RL algorithm: the advantage estimator (verl's ``algorithm`` keys). ``gamma``
    and ``lam`` stay in ``ppo``."""

    adv_estimator: str = "gae"
    """Advantage estimator: a name in ``fusedrl.algorithms.available_adv_estimators()``
    (``gae``: PPO with a critic; ``grpo``, ``rloo``, ``reinforce_plus_plus``,
    ``reinforce_plus_plus_baseline``: critic-free, with ``actor.rollout_n`` samples per
    prompt for the group ones), or ``module:NAME`` / ``path/file.py:NAME`` for one a user
    module registers with ``@register_adv_estimator("NAME")``."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO: divide by the group's std; false gives Dr. GRPO (Liu et al. 2025, §3.1)."""
    filter_groups: FilterGroupsSection = field(default_factory=FilterGroupsSection)
    """DAPO's dynamic sampling (off by default)."""

    def __post_init__(self) -> None:
        _require(bool(self.adv_estimator.strip()), "algorithm.adv_estimator",
                 self.adv_estimator, "must name an estimator")


@dataclass
class ActorSection:
    """Policy-update options beyond PPO's defaults (verl's ``actor_rollout_ref.actor``
    and ``rollout.n`` keys): GRPO/DAPO/Dr. GRPO losses."""

    rollout_n: int = 1
    """Responses sampled per prompt (a group); group-relative estimators need >= 2."""
    loss_agg_mode: str = "token-mean"
    """How per-token losses become one: ``token-mean`` (every token counts once),
    ``seq-mean-token-mean`` (GRPO: each response counts once),
    ``seq-mean-token-sum`` (Dr. GRPO: each response's token sum)."""
    clip_ratio_low: float | None = None
    """Lower policy-ratio clip, ``1 - clip_ratio_low``; unset: ``ppo.clip_ratio``."""
    clip_ratio_high: float | None = None
    """Upper policy-ratio clip, ``1 + clip_ratio_high``; unset: ``ppo.clip_ratio``. DAPO's
    clip-higher uses 0.28 with a low of 0.2 (Yu et al. 2025, §3.1)."""
    use_kl_loss: bool = False
    """KL to the reference as a loss term (GRPO) instead of a reward penalty; set
    ``ppo.kl_coef: 0`` to drop the reward penalty."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss term (verl's default)."""
    kl_loss_type: str = "low_var_kl"
    """KL estimator of the loss term: ``k1``, ``k2`` (= ``mse``), ``k3`` (= ``low_var_kl``,
    GRPO's), ``abs``."""

    def __post_init__(self) -> None:
        _require(self.rollout_n >= 1, "actor.rollout_n", self.rollout_n, "must be >= 1")
        if self.clip_ratio_low is not None:
            _require(0 < self.clip_ratio_low < 1, "actor.clip_ratio_low", self.clip_ratio_low,
                     "must be in (0, 1)")
        if self.clip_ratio_high is not None:
            _require(self.clip_ratio_high > 0, "actor.clip_ratio_high", self.clip_ratio_high,
                     "must be > 0")
        _require(self.kl_loss_coef >= 0, "actor.kl_loss_coef", self.kl_loss_coef,
                 "must be >= 0")


@dataclass
class FusionSection:
    """The switches of RLHFuse's two fusions (arXiv 2409.13221). The third idea,
    reallocation (ReaLHF), needs no switch: it runs wherever two calls of one model are
    placed differently (``placement.*``)."""

    interstage: bool | None = None
    """Inter-stage fusion (RLHFuse §4, :mod:`fusedrl.interstage`): one shared sample
    queue over the ``actor_gen`` instances, finished samples streamed to inference, and
    the long tail migrated onto fewer instances so that the freed devices receive the
    inference models (reallocation engine) and start inference at once. Unset
    (default): on when ``actor_gen`` has >= 2 dp replicas placed ``tp=pp=1``; ``true``:
    required (a config error where the placement does not allow it); ``false``: off."""
    interstage_policy: str = "rlhfuse"
    """How the migration threshold ``Rt`` is chosen: a name in
    ``fusedrl.scheduler.interstage.available_policies()`` (``rlhfuse``: simulated over
    the observed lengths and re-tuned; ``fixed``: 20% of the batch; ``none``: stream
    to inference but never migrate; ``partial``: partial rollouts, :mod:`fusedrl.partial`
    -- more samples launched than the batch needs, the batch closed at its target count
    and the unfinished samples resumed first in the next iteration, on one device too)."""
    oversample: float = 1.0
    """Partial rollouts: samples in flight beyond the batch, as a fraction of it (groups
    launched per iteration: ``ceil(rollout_batch_size * (1 + oversample))`` minus those
    carried over). 1 (default): each iteration launches about a batch while it trains on
    the batch launched before, one-step off-policy (with ``max_staleness: 1``); measured
    1.33x the ``rlhfuse`` policy's samples/s on lognormal(16, p99 160) lengths, 2 CPU
    devices, where 0.5 gave 1.00x (``fusedrl bench interstage --policy
    rlhfuse,partial``)."""
    max_staleness: int = 1
    """Partial rollouts: a sample is trained from weights at most this many updates newer
    than those that sampled its oldest token (AReaL's bound, arXiv 2505.24298 §4); an
    older carried sample restarts from its prompt (``partial/tokens_wasted``)."""
    behav_weight_cap: float = 5.0
    """Partial rollouts: tokens whose behaviour importance weight ``pi_old / pi_behav``
    exceeds this are left out of the policy loss (AReaL's ``behav_imp_weight_cap``);
    0: no cap."""
    interstage_steps: int = 4
    """Engine steps a generation instance runs per controller round trip (fewer:
    finished samples reach inference sooner; more: less dispatch overhead)."""
    migration: str = "auto"
    """How a long-tail sample moves to its destination instance when inter-stage fusion
    migrates it (RLHFuse §4): ``kv`` sends its KV cache over the worker group (the
    native engine; bucketed, :mod:`fusedrl.interstage.kv_migration`), ``reprefill``
    re-reads prompt + generated tokens on the destination, ``auto`` picks per sample
    whichever the calibrated cost model (``GenCostModel.kv_transfer_s`` against
    ``reprefill_s``, the simulator's) says is cheaper. Tokens and log-probs are those of
    an unmigrated run either way; backends without KV export (vLLM) re-prefill."""
    intrastage: bool = False
    """Intra-stage fusion (RLHFuse §5, :mod:`fusedrl.intrastage`): actor and critic
    trained together in one fused pipeline schedule; each worker of the training
    placement runs its stage of both models in the order a searched schedule gives, so
    each pipeline's bubbles fill with the other's work. Needs ``placement.actor_train``
    and ``critic_train`` on the same devices with the same dp/tp/pp, every critic stage
    on the devices of one actor stage (RLHFuse: reversed, e.g. ``dp1tp1pp2@0-1`` and
    ``dp1tp1pp2@1,0``). False: the actor's 1F1B, then the critic's. The weights after a
    step are the same either way."""

    def __post_init__(self) -> None:
        _require(self.interstage_steps >= 1, "fusion.interstage_steps",
                 self.interstage_steps, "must be >= 1")
        _require(self.oversample >= 0, "fusion.oversample", self.oversample, "must be >= 0")
        _require(self.max_staleness >= 0, "fusion.max_staleness", self.max_staleness,
                 "must be >= 0")
        _require(self.behav_weight_cap >= 0, "fusion.behav_weight_cap", self.behav_weight_cap,
                 "must be >= 0 (0: no cap)")
        _require(self.migration in ("auto", "kv", "reprefill"), "fusion.migration",
                 self.migration, "must be one of auto, kv, reprefill")


@dataclass
class TrainerSection:
    """The outer loop."""

    iterations: int = 10
    """PPO iterations to run (in total, counting a resumed run's earlier ones)."""
    seed: int = 0
    """Seed of initialisation, prompt order and sampling."""
    save_every: int = 0
    """Write a checkpoint every N iterations (and at the end); 0: only at the end."""
    out_dir: str = "runs/default"
    """Output directory (metrics.jsonl, checkpoints/); ``--out`` overrides it."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (older ones are deleted after each save; the
    one a run resumed from is never deleted by that run); 0 keeps all."""
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    """Metric sinks, as verl's ``trainer.logger``: ``console`` (one line per iteration on
    stdout), ``jsonl`` (``OUT/metrics.jsonl``; always written, resume reads it),
    ``tensorboard`` (``OUT/tensorboard``), ``wandb`` (offline unless ``WANDB_MODE`` says
    otherwise)."""
    project_name: str = "fusedrl"
    """W&B project."""
    experiment_name: str = ""
    """W&B run name; empty: the output directory's name."""
    val_every: int = 0
    """Validate every N iterations (``val/score/mean`` on the validation prompts,
    ``data.val_path`` or the task's held-out split, generated on the generation
    placement); 0: never."""
    val_before_train: bool = False
    """Validate the initial policy before the first iteration (logged as iteration 0)."""
    val_greedy: bool = True
    """Validation decodes greedily; false samples as training does."""
    log_samples: int = 0
    """Write the first N prompt/response/reward triples of each iteration to
    ``OUT/samples.jsonl``."""
    timeline_every: int = 0
    """Every N iterations write the iteration's per-device events as a timeline picture
    ``OUT/timeline/iter_N.png`` (one row per device, one colour per model call) and
    ``OUT/timeline/iter_N.jsonl``; 0: never."""

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "trainer.iterations", self.iterations, "must be >= 1")
        _require(self.save_every >= 0, "trainer.save_every", self.save_every, "must be >= 0")
        _require(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", self.keep_checkpoints,
                 "must be >= 0 (0 keeps all)")
        for key in ("timeline_every", "val_every", "log_samples"):
            _require(getattr(self, key) >= 0, f"trainer.{key}", getattr(self, key),
                     "must be >= 0")


@dataclass
class ClusterSection:
    """The devices the run uses: one Ray worker per device (a GPU, or one CPU core)."""

    devices: int = 1
    """Number of devices (workers), ids ``0..devices-1``. 1 with trivial placements runs
    the in-process single-device trainer; more starts the Ray runtime."""
    address: str = ""
    """Ray cluster to join (``ray start --head`` prints it, e.g. ``10.0.0.1:6379``);
    empty starts a local Ray instance. ``fusedrl train --cluster`` overrides it."""
    accelerator: str = "auto"
    """Device kind the models run on: ``cpu``, ``cuda``, or ``auto`` (``cuda`` when torch
    sees a GPU in the process that loads the config, else ``cpu``; resolved on load, so
    the run's ``config.yaml`` records the kind used; a driver without a GPU joining a GPU
    cluster sets ``cuda``). The single-device trainer uses
    GPU 0 of its process (needs a CUDA build of torch, checked when the trainer starts);
    the Ray runtime gives each worker one GPU and needs ``cluster.devices`` GPUs in the
    Ray cluster (checked before any worker starts). Collectives: gloo on CPU, NCCL for
    CUDA tensors."""

    peak_flops: float = 0.0
    """Peak FLOP/s of one device for the MFU metrics (``perf/mfu/actor``, ``critic``,
    ``ref``: model FLOPs ``6 N T`` per update, ``2 N T`` per forward, over busy seconds
    x devices x this). 0: the datasheet bf16 peak of a known GPU (H100, H200, A100), else
    a float32 matmul peak measured at startup, reported as ``perf/mfu_measured_peak/*``
    (``fusedrl/perf.py``)."""

    def __post_init__(self) -> None:
        _require(self.peak_flops >= 0, "cluster.peak_flops", self.peak_flops, "must be >= 0")
        _require(self.devices >= 1, "cluster.devices", self.devices, "must be >= 1")
        _require(self.accelerator in ("auto", "cpu", "cuda"), "cluster.accelerator",
                 self.accelerator, "must be auto, cpu or cuda")
        if self.accelerator == "auto":
            from fusedrl.devices import auto_accelerator

            self.accelerator = auto_accelerator()


PLACEMENT_ROLES = tuple(r.value for r in _Role)
"""Model function calls that each run on their own placement (:mod:`fusedrl.roles`)."""

TRIVIAL_PLACEMENT = "dp1tp1pp1@0"


@dataclass
class PlacementSection:
    """Device placement and parallel layout of every model function call, in the text
    form of docs/design.md (``dp2tp1pp2@0-3``: dp x tp x pp ranks on devices 0..3, Megatron
    rank order). Empty fields take ``default``; an empty ``default`` is ``dp1tp1pp1@0``."""

    default: str = ""
    """Placement of every call not given below."""
    actor_train: str = ""
    """Actor training (PPO policy update)."""
    actor_gen: str = ""
    """Rollout generation; weights are copied from ``actor_train`` after each update
    when the two differ."""
    actor_infer: str = ""
    """Old log-probs of the rollouts; empty: the ``actor_train`` placement (its module
    itself). Weights copied from ``actor_train`` after each update when it differs.
    With inter-stage fusion the old log-probs run on freed generation devices."""
    critic_train: str = ""
    """Critic training (value update)."""
    critic_infer: str = ""
    """Critic values of the rollouts; weights copied from ``critic_train`` when it differs."""
    ref: str = ""
    """Reference-model log-probs (KL penalty)."""
    reward: str = ""
    """Reward-model scores (``reward.type: model``)."""
    keep_inference_copies: bool = True
    """Memory vs time for the inference-only copies of trained models (``actor_gen``,
    ``critic_infer`` placed apart from their training placement): true keeps them between
    iterations; false drops them (weights and generation KV cache) once generation and
    inference are done, freeing that memory during training, and re-allocates them when
    the next reallocation writes the new weights (ReaLHF, arXiv 2406.14088). Training
    copies always keep their weights and optimizer state."""

    def __post_init__(self) -> None:
        from fusedrl.layout import Placement

        for key in ("default",) + PLACEMENT_ROLES:
            text = getattr(self, key)
            if text:
                try:
                    Placement.parse(text)
                except ValueError as e:
                    raise ConfigError(f"config key placement.{key}={text!r}: {e}") from None

    def of(self, role: str) -> "Placement":  # noqa: F821 - fusedrl.layout.Placement
        """The placement of ``role`` (one of :data:`PLACEMENT_ROLES`), defaults resolved."""
        from fusedrl.layout import Placement

        if role not in PLACEMENT_ROLES:
            raise ValueError(f"unknown placement role {role!r}; known: {PLACEMENT_ROLES}")
        text = getattr(self, role)
        if role == "actor_infer" and not text:  # the old log-probs: the training module
            return self.of("actor_train")
        return Placement.parse(text or self.default or TRIVIAL_PLACEMENT)

    def is_trivial(self) -> bool:
        """Every call on device 0 without parallelism."""
        return all(str(self.of(r)) == TRIVIAL_PLACEMENT for r in PLACEMENT_ROLES)


@dataclass
class Config:
    """A whole experiment."""

    model: ModelSection = field(default_factory=ModelSection)
    """Networks."""
    data: DataSection = field(default_factory=DataSection)
    """Prompts."""
    reward: RewardSection = field(default_factory=RewardSection)
    """Scoring."""
    generation: GenerationSection = field(default_factory=GenerationSection)
    """Rollouts."""
    ppo: PPOSection = field(default_factory=PPOSection)
    """Algorithm."""
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    """Advantage estimator."""
    actor: ActorSection = field(default_factory=ActorSection)
    """Policy loss options and samples per prompt."""
    fusion: FusionSection = field(default_factory=FusionSection)
    """Inter- and intra-stage fusion switches."""
    trainer: TrainerSection = field(default_factory=TrainerSection)
    """Loop, seed, output."""
    cluster: ClusterSection = field(default_factory=ClusterSection)
    """Devices and Ray cluster."""
    placement: PlacementSection = field(default_factory=PlacementSection)
    """Where each model function call runs."""
    plugins: list[str] = field(default_factory=list)
    """Python modules (names, or paths to ``.py`` files) imported before the rest of the
    config is checked, in the driver and in every Ray worker, so that the generation
    backends, inter-stage policies, reward functions and advantage estimators they
    register can be named here (:mod:`fusedrl.plugins`); ``fusedrl train --plugin``
    adds to it."""

    def __post_init__(self) -> None:
        ob = self.reward.overlong_buffer
        _require(not ob.enable or ob.len <= self.generation.max_new_tokens,
                 "reward.overlong_buffer.len", ob.len,
                 f"must be <= generation.max_new_tokens={self.generation.max_new_tokens}")
        # Fit to the cluster is checked here; fit to the model needs the ModelConfig and
        # is checked by the runtime's setup, still before any worker starts.
        for role in PLACEMENT_ROLES:
            try:
                self.placement.of(role).check_cluster(self.cluster.devices)
            except ValueError as e:
                key = role if getattr(self.placement, role) else "default"
                raise ConfigError(f"config key placement.{key}: {e} (cluster.devices="
                                  f"{self.cluster.devices})") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------ loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; it is a number to any user.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # .inf / .nan would train on NaN losses: no config float is meant to be one.
            _require(math.isfinite(number), key, value, "must be a finite number")
            return number
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"unknown config key {prefix}{k} (known in this section: "
                              f"{', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (``3``, ``1e-5``, ``true``, ``x``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                plugins: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML) if given, apply ``key=value`` overrides, import the config's
    ``plugins`` and then ``plugins`` (``--plugin``), validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                              f"at offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") \
                from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = loaded or {}
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(tree, k, v)
    _import_plugins(tree, plugins)
    try:
        config = _build(Config, tree)
    except TypeError as e:  # e.g. a section given a scalar
        raise ConfigError(f"config: {e}") from None
    # Checks against other modules (registries, schedulers) live in one place.
    from fusedrl.validate import check_config

    check_config(config)
    return config


def _import_plugins(tree: dict, extra: Sequence[str]) -> None:
    # First, so that the registry names the sections check (generation.backend,
    # fusion.interstage_policy, ...) include what the plug-ins register.
    from fusedrl.plugins import load_plugins, normalize

    given = tree.get("plugins", [])
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(p, str) for p in given):
        raise ConfigError(f"config key plugins: expected a list of module names or .py "
                          f"files, got {given!r}")
    specs = list(dict.fromkeys(normalize(p) for p in [*given, *extra]))
    load_plugins(specs)
    if specs or "plugins" in tree:
        tree["plugins"] = specs


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
