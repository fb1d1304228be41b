"""The single-device stages: every model, the generation engine and both optimizers on
one device (``cluster.accelerator``: the CPU or GPU 0 of this process).

:class:`LocalModels` builds the four models once; :class:`LocalRollout` generates with
the engine and runs inference micro-batch by micro-batch; :class:`LocalUpdate` runs the
shared PPO update (:func:`fusedrl.update.run_update`) with a plain forward and backward
per micro-batch; :class:`LocalSync` reloads a generation backend that keeps its own
weights (vLLM) after each update (the native engine generates with the actor itself).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusedrl.devices import device_of, synchronize
from fusedrl.generation.backend import backend_from_config
from fusedrl.models.build import (TORCH_DTYPES, build_model, load_full_state,
                                  resolve_compute_dtype)
from fusedrl.models.checkpoint import load_checkpoint, load_safetensors_dir, save_hf_checkpoint
from fusedrl.models.hub import resolve_model_path
from fusedrl.optim import build_optimizer
from fusedrl.packing import forward, select
from fusedrl.runtime.heap import release_host_memory
from fusedrl.rollout import RolloutBatch, infer_head
from fusedrl.stages import RolloutOutput, StageContext, register_stage
from fusedrl.timeline import EventLog
from fusedrl.update import inference_micro_batches, merge_update_stats, run_update, unpermute


class LocalModels:
    """Actor, critic, reference, optional reward model and the generation backend of a
    single-device run, built from the setup's weights on ``device_of(config)``."""

    def __init__(self, config, setup):
        self.device = dev = device_of(config)  # ConfigError before any model is built
        c, s = config, setup
        dtype = TORCH_DTYPES[c.model.dtype]
        frozen = TORCH_DTYPES[c.model.frozen_dtype]  # reference and reward model
        frozen_compute = resolve_compute_dtype(frozen, dev, c.model.frozen_compute_dtype)
        seed, mc = c.trainer.seed, s.model_config
        self.actor = build_model(mc, "lm", s.actor_state, seed=seed, dtype=dtype, device=dev)
        # The reference is the initial actor, converted to the frozen dtype (from the
        # actor's weights: a random init drawn in another dtype would differ).
        init = s.actor_state if s.actor_state is not None else self.actor.hf_state_dict()
        self.ref = build_model(mc, "lm", init, seed=seed, dtype=frozen, device=dev,
                               compute_dtype=frozen_compute).eval().requires_grad_(False)
        from fusedrl.validate import uses_critic

        self.critic = None  # critic-free estimators (GRPO, RLOO...): none built
        if uses_critic(c):
            self.critic = build_model(mc, "value", s.critic_state or s.actor_state,
                                      seed=seed + 1, dtype=dtype, device=dev)
        self.reward_model = None
        if c.reward.type == "model":
            rm_config, rm_state = load_checkpoint(resolve_model_path(c.reward.model_path))
            self.reward_model = build_model(
                rm_config, "value", rm_state, dtype=frozen, device=dev,
                compute_dtype=frozen_compute).eval().requires_grad_(False)
        for model in (self.actor, self.critic):
            if model is not None:
                model.gradient_checkpointing = c.model.gradient_checkpointing
        tok = s.tokenizer
        # The native engine generates with the actor module itself (weights in place);
        # other backends (vLLM) hold their own copy, refreshed after every update.
        self.engine = backend_from_config(c, self.actor, eos_token_ids=tok.eos_token_ids,
                                          pad_token_id=tok.pad_token_id)
        self.events = EventLog(0, synchronize=lambda: synchronize(dev))
        # The models hold the weights now: the setup's copy (a GGUF dequantized to
        # float32, the actor's size) would stay resident for the whole run. The Ray
        # controller drops it likewise (runtime/cluster.py).
        s.actor_state = s.critic_state = None
        del init
        release_host_memory()


class LocalRollout:
    """Generate the whole batch, then infer it micro-batch by micro-batch."""

    def __init__(self, config, setup, models: LocalModels):
        self.config, self.setup, self.m = config, setup, models

    @torch.no_grad()
    def generate(self, requests, params) -> list:
        self.m.actor.eval()
        with self.m.events.record("gen"):
            return self.m.engine.generate(requests, params)

    @torch.no_grad()
    def run(self, requests, params, close=None) -> RolloutOutput:
        m, c = self.m, self.config
        carried = []
        if close is None:
            samples = self.generate(requests, params)
        else:  # partial rollouts: the batch closes at its target count (fusedrl.partial)
            from fusedrl.partial import generate_until_closed

            m.actor.eval()
            with m.events.record("gen"):
                samples, carried = generate_until_closed(m.engine, requests, params, close)
        batch = RolloutBatch.from_samples(samples, self.setup.tokenizer.pad_token_id)
        batch = batch.to(m.device)
        width, temp = batch.response_mask.shape[1], c.generation.temperature
        calls = [("logp:actor_infer", m.actor, "logp"), ("logp:ref", m.ref, "logp")]
        if m.critic is not None:
            m.critic.eval()
            calls.append(("values", m.critic, "values"))
        if m.reward_model is not None:
            calls.append(("score", m.reward_model, "score"))
        outs: dict[str, list] = {name: [] for name, _, _ in calls}
        micros = inference_micro_batches(batch, c.ppo)
        for idx in micros:
            mb = select(batch, idx.to(m.device), c.ppo.packed)
            for name, model, kind in calls:
                with m.events.record(name):
                    outs[name].append(infer_head(kind, forward(model, mb), mb,
                                                 model.tp_group, width, temp))
        cat = {k: unpermute(v, micros) for k, v in outs.items()}
        return RolloutOutput(batch, cat["logp:actor_infer"], cat["logp:ref"], cat.get("values"),
                             cat.get("score"), carried=carried)

    def close(self) -> None:
        self.m.engine.stop()


class _LocalTrainable:
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.tp_group = model.tp_group

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_grads(self) -> None:
        """One device: nothing to reduce."""

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(
            params, max_norm if max_norm > 0 else float("inf")))

    def step(self) -> None:
        self.optimizer.step()


class LocalUpdate:
    """PPO epochs on one device: per micro-batch a forward and backward of the actor,
    then of the critic."""

    name = "local"

    def __init__(self, config, models: LocalModels):
        c = config.ppo
        self.config, self.m = config, models
        seed = config.trainer.seed
        self.optimizers = {"actor": build_optimizer(models.actor.parameters(), c.actor_lr,
                                                    c.weight_decay, c.optimizer_state_dtype,
                                                    seed)}
        if models.critic is not None:
            self.optimizers["critic"] = build_optimizer(
                models.critic.parameters(), c.critic_lr, c.weight_decay,
                c.optimizer_state_dtype, seed + 1)

    def _modules(self) -> dict:
        return {"actor": self.m.actor, "critic": self.m.critic}

    def train(self, batch, targets, schedule) -> dict:
        m = self.m
        # the engine's KV cache and prepared weights, then the rollout's freed buffers,
        # before gradients and optimizer state take their place
        m.engine.release()
        release_host_memory()
        schedule = [[idx.to(m.device) for idx in micros] for micros in schedule]
        models = {}
        for name, opt in self.optimizers.items():
            self._modules()[name].train()
            models[name] = _LocalTrainable(self._modules()[name], opt)

        # The actor's epochs, then the critic's: their updates are independent (targets
        # are fixed), so the result is the same as interleaving them, and only one
        # model's gradients exist at a time (0.5 GB less at SmolLM2's size).
        out = {}
        for name, tm in models.items():
            def forward_backward(_m, micros, loss, name=name, tm=tm):
                for k, idx in enumerate(micros):
                    mb = select(batch, idx, self.config.ppo.packed)
                    with m.events.record(f"train:{name}"):
                        loss(name, forward(tm.model, mb), mb, idx, k).backward()

            out.update(run_update(schedule, {name: tm}, forward_backward, targets,
                                  self.config, self.config.generation.temperature))
        return merge_update_stats({k: [v] for k, v in out.items()})

    def save(self, directory: Path, tokenizer) -> dict:
        """``actor/`` (and ``critic/``) as Hugging Face directories; the optimizer states
        go into the trainer state."""
        for name in self.optimizers:
            module = self._modules()[name]
            save_hf_checkpoint(directory / name, module.config, module.hf_state_dict(),
                               "lm" if name == "actor" else "value",
                               tokenizer if name == "actor" else None)
        return {f"{name}_opt": opt.state_dict() for name, opt in self.optimizers.items()}

    def load(self, directory: Path, state: dict) -> None:
        for name, opt in self.optimizers.items():
            _, weights = load_safetensors_dir(directory / name)
            load_full_state(self._modules()[name], weights)
            opt.load_state_dict(state[f"{name}_opt"])

    def close(self) -> None:
        """Nothing to stop: the models live in this process."""


class LocalSync:
    """A backend with its own weights (vLLM) reloads them from the actor after each
    update and after a checkpoint load; the native engine uses the actor itself."""

    def __init__(self, config, models: LocalModels):
        self.own_weights = config.generation.backend != "native"
        self.m = models

    def before_update(self) -> None:
        """Nothing to drop: one device holds each model once."""

    def after_update(self) -> dict:
        if self.own_weights:
            with self.m.events.record("realloc"):
                self.m.engine.update_weights()
        return {}

    def after_load(self) -> None:
        if self.own_weights:
            self.m.engine.update_weights()


@register_stage("rollout", "local")
def _local_rollout(ctx: StageContext):
    return LocalRollout(ctx.config, ctx.setup, ctx.models)


@register_stage("update", "local")
def _local_update(ctx: StageContext):
    return LocalUpdate(ctx.config, ctx.models)


@register_stage("weight_sync", "local")
def _local_sync(ctx: StageContext):
    return LocalSync(ctx.config, ctx.models)
