"""PPO on one device: actor, critic, reference and reward, one iteration at a time.

One iteration (DESIGN.md "One PPO iteration")::

    prompts -> generate (actor) -> score (rule or reward model)
            -> inference: old log-probs (actor), ref log-probs, values (critic)
            -> token rewards (KL-penalised) -> GAE -> PPO epochs (actor + critic)

Every random choice is a function of (seed, iteration) or (seed, sample id): prompt
order, sampling streams and mini-batch shuffles. A run resumed from a checkpoint
therefore repeats the uninterrupted run's next iteration exactly.

Device (``cluster.accelerator``, :mod:`fusedrl.devices`): the four models, the engine's
KV cache (``model.new_cache`` follows the weights), the rollout batch, GAE (its backend
follows the tensors' device: numba on CPU, cupy or torch on CUDA) and both optimizers
live on one device. Random draws that fix the run (initialisation, shuffles, sampling
streams) are made on the CPU, so a seed gives the same run on every device up to float
rounding. Metrics leave as Python floats; stage timers synchronise the device first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from fusedrl.algorithms import ppo
from fusedrl.algorithms.rewards import call_reward, load_reward_fn
from fusedrl.config import Config
from fusedrl.data.prompts import PromptRecord, load_prompts
from fusedrl.devices import device_of, timer
from fusedrl.generation import Request, SamplingParams, forced_lengths
from fusedrl.generation.backend import backend_from_config
from fusedrl.models.build import TORCH_DTYPES, build_model
from fusedrl.models.checkpoint import load_checkpoint
from fusedrl.models.config import PRESETS, ModelConfig
from fusedrl.models.hub import resolve_model_path
from fusedrl.models.tokenizer import CharTokenizer, load_hf_tokenizer
from fusedrl.rollout import RolloutBatch, response_logprobs, response_values, sequence_scores


@dataclass
class Setup:
    """Everything an iteration needs, built once from a :class:`Config`."""

    tokenizer: object
    model_config: ModelConfig
    prompts: list[PromptRecord]
    prompt_ids: list[list[int]]
    reward_fn: object | None
    actor_state: dict | None = None
    critic_state: dict | None = None
    extra: dict = field(default_factory=dict)


def _task(config: Config):
    from fusedrl.data.builtin import TASKS

    return TASKS.get(config.data.task)


def build_setup(config: Config) -> Setup:
    """Tokenizer, model shape, initial weights, prompts and reward; raises clear errors."""
    task = _task(config)
    actor_state = critic_state = None
    if config.model.path:
        path = resolve_model_path(config.model.path)
        model_config, actor_state = load_checkpoint(path)
        tokenizer = load_hf_tokenizer(path)
    else:
        if task is None or task.alphabet is None:
            raise ValueError(f"config key model.path is empty: training from scratch needs a "
                             f"built-in task with its own alphabet, not data.task="
                             f"{config.data.task!r}")
        tokenizer = CharTokenizer(task.alphabet)
        base = PRESETS[config.model.preset]
        vocab = config.model.vocab_size or tokenizer.vocab_size
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"config key model.vocab_size={vocab} is smaller than the "
                             f"tokenizer's {tokenizer.vocab_size}")
        model_config = ModelConfig(**{**base.to_dict(), "vocab_size": vocab})
    if config.model.critic_path:
        _, critic_state = load_checkpoint(resolve_model_path(config.model.critic_path))

    if task is not None:
        prompts = task.build(config.data.num_prompts, config.trainer.seed)
    else:
        prompts = load_prompts(config.data.path, config.data.prompt_key, config.data.label_key)
    prompt_ids = []
    for i, rec in enumerate(prompts):
        ids = tokenizer.render_prompt(rec.prompt, config.data.chat_template)
        if len(ids) > config.data.max_prompt_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than config key "
                             f"data.max_prompt_len={config.data.max_prompt_len}")
        prompt_ids.append(ids)
    need = config.data.max_prompt_len + config.generation.max_new_tokens
    if need > model_config.max_position_embeddings:
        raise ValueError(f"data.max_prompt_len + generation.max_new_tokens = {need} exceeds the "
                         f"model's max_position_embeddings={model_config.max_position_embeddings}")

    reward_fn = None
    if config.reward.type == "rule":
        if config.reward.function:
            reward_fn = load_reward_fn(config.reward.function)
        elif task is not None:
            reward_fn = task.reward
        else:
            raise ValueError("config key reward.function is empty and data.task='file' has no "
                             "built-in reward: give reward.function or reward.type=model")
    return Setup(tokenizer, model_config, prompts, prompt_ids, reward_fn, actor_state,
                 critic_state)


class PPOTrainer:
    """Single-device PPO (the reference the distributed runtime must match).

    Trainer protocol shared with ``fusedrl.runtime.controller``: ``step() -> metrics``,
    ``iteration``, ``save_checkpoint(out)``, ``load_checkpoint(path)``, ``close()``.
    """

    device = torch.device("cpu")
    """Where the models and the iteration's tensors live (the Ray runtime's controller,
    a subclass, holds only CPU tensors and keeps this default)."""

    def __init__(self, config: Config, setup: Setup | None = None):
        self.config = config
        self.device = dev = device_of(config)  # ConfigError before any model is built
        self.setup = setup or build_setup(config)
        s, c = self.setup, config
        dtype = TORCH_DTYPES[c.model.dtype]
        seed = c.trainer.seed
        mc = s.model_config
        self.actor = build_model(mc, "lm", s.actor_state, seed=seed, dtype=dtype, device=dev)
        self.ref = build_model(mc, "lm", s.actor_state, seed=seed, dtype=dtype,
                               device=dev).eval()
        self.ref.requires_grad_(False)
        self.critic = build_model(mc, "value", s.critic_state or s.actor_state, seed=seed + 1,
                                  dtype=dtype, device=dev)
        self.reward_model = None
        if c.reward.type == "model":
            rm_config, rm_state = load_checkpoint(resolve_model_path(c.reward.model_path))
            self.reward_model = build_model(rm_config, "value", rm_state, dtype=dtype,
                                            device=dev).eval()
            self.reward_model.requires_grad_(False)
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=c.ppo.actor_lr,
                                           weight_decay=c.ppo.weight_decay)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=c.ppo.critic_lr,
                                            weight_decay=c.ppo.weight_decay)
        self.kl_ctl = (ppo.AdaptiveKLController(c.ppo.kl_coef, c.ppo.target_kl, c.ppo.kl_horizon)
                       if c.ppo.adaptive_kl else ppo.FixedKLController(c.ppo.kl_coef))
        tok = s.tokenizer
        # The native engine generates with the actor module itself (weights in place);
        # other backends (vLLM) hold their own copy, refreshed after every train step.
        self.engine = backend_from_config(c, self.actor, eos_token_ids=tok.eos_token_ids,
                                          pad_token_id=tok.pad_token_id)
        self.iteration = 0  # iterations completed

    # ------------------------------------------------------------------ data

    def prompt_indices(self, iteration: int) -> list[int]:
        """Prompts of ``iteration``: epochs over a per-epoch shuffle of the dataset."""
        n, b = len(self.setup.prompts), self.config.ppo.rollout_batch_size
        orders: dict[int, list[int]] = {}  # one shuffle per epoch the batch touches
        out = []
        for k in range(iteration * b, (iteration + 1) * b):
            epoch, pos = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = list(range(n))
                random.Random(self.config.trainer.seed * 1_000_003 + epoch).shuffle(
                    orders[epoch])
            out.append(orders[epoch][pos])
        return out

    def sampling_params(self) -> SamplingParams:
        g = self.config.generation
        return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                              max_new_tokens=g.max_new_tokens, seed=self.config.trainer.seed,
                              ignore_eos=bool(g.forced_lengths))

    def requests(self, iteration: int, prompts: list[int]) -> list[Request]:
        """The iteration's samples on dataset rows ``prompts``; ids are global so every
        sample has its own stream."""
        g, b = self.config.generation, self.config.ppo.rollout_batch_size
        forced = [None] * b
        if g.forced_lengths:
            forced = forced_lengths(g.forced_lengths, b,
                                    seed=self.config.trainer.seed * 1_000_003 + iteration,
                                    max_len=g.max_new_tokens)
        return [Request(iteration * b + j, list(self.setup.prompt_ids[i]), max_new_tokens=n)
                for j, (i, n) in enumerate(zip(prompts, forced))]

    # ------------------------------------------------------------- iteration

    def step(self) -> dict:
        """Run one PPO iteration; returns its metrics (DESIGN.md names)."""
        c, s = self.config, self.setup
        it = self.iteration
        timing: dict[str, float] = {}
        dev = self.device
        t_step = timer(dev)

        # 1. generate
        t0 = timer(dev)
        idx = self.prompt_indices(it)
        self.actor.eval()
        samples = self.engine.generate(self.requests(it, idx), self.sampling_params())
        batch = RolloutBatch.from_samples(samples, s.tokenizer.pad_token_id)
        if batch.input_ids.device != dev:
            batch = batch.to(dev)
        timing["gen"] = timer(dev) - t0

        # 2. inference: scores, old/ref log-probs, values
        t0 = timer(dev)
        scores = self.score(batch, [s.prompts[i] for i in idx])
        old_logp, ref_logp, values = self.infer(batch)
        timing["inference"] = timer(dev) - t0

        # 3. advantages
        mask = batch.response_mask
        rewards = ppo.token_level_rewards(scores, old_logp, ref_logp, mask, self.kl_ctl.value,
                                          c.ppo.kl_estimator)
        # Imported here, after the generation backend started: vLLM 0.32's triton kernel
        # dispatcher scans every loaded module at start-up and fails on llvmlite's
        # (numba's) function wrappers.
        from fusedrl.kernels.gae import compute_gae

        advantages, returns = compute_gae(rewards, values, mask, c.ppo.gamma, c.ppo.lam)
        if c.ppo.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask)
        kl = ppo.masked_mean(ppo.kl_penalty(old_logp, ref_logp, c.ppo.kl_estimator), mask)

        # 4. train
        t0 = timer(dev)
        train_stats = self.train(batch, old_logp, values, advantages, returns)
        timing["train"] = timer(dev) - t0
        if c.generation.backend != "native":
            t0 = timer(dev)
            self.engine.update_weights()
            timing["realloc"] = timer(dev) - t0
        self.kl_ctl.update(float(kl), len(batch))
        timing["step"] = timer(dev) - t_step

        self.iteration += 1
        rlen = batch.response_lens.float()
        metrics = {
            "iteration": self.iteration,
            "critic/score/mean": float(scores.mean()),
            "critic/score/max": float(scores.max()),
            "critic/score/min": float(scores.min()),
            "critic/values/mean": float(ppo.masked_mean(values, mask)),
            "critic/advantages/mean": float(ppo.masked_mean(advantages, mask)),
            "critic/returns/mean": float(ppo.masked_mean(returns, mask)),
            "actor/reward_kl_penalty": float(kl),
            "actor/kl_coef": float(self.kl_ctl.value),
            "response_length/mean": float(rlen.mean()),
            "response_length/max": float(rlen.max()),
            "response_length/clip_ratio": float(
                (batch.response_lens >= c.generation.max_new_tokens).float().mean()),
            "rollout/logprob_diff_max": float(
                ((batch.gen_logprobs - old_logp).abs() * mask).max()),
            **train_stats,
            **{f"timing_s/{k}": v for k, v in timing.items()},
            "perf/total_num_tokens": batch.num_tokens(),
            "perf/throughput": batch.num_tokens() / timing["step"],
        }
        return metrics

    def score(self, batch: RolloutBatch, records: list[PromptRecord]) -> torch.Tensor:
        if self.reward_model is not None:
            with torch.no_grad():
                return torch.cat([sequence_scores(self.reward_model,
                                                  batch.select(i.to(self.device))).float()
                                  for i in self._micro_indices(len(batch))])
        tok = self.setup.tokenizer
        out = []
        # Rule rewards read token ids in Python: one copy to the host, not one per row.
        responses, mask = batch.response_ids().cpu(), batch.response_mask.cpu()
        for b, rec in enumerate(records):
            ids = responses[b][mask[b] > 0].tolist()
            ids = [t for t in ids if t not in tok.eos_token_ids]
            prompt = rec.prompt if isinstance(rec.prompt, str) else rec.prompt[-1]["content"]
            out.append(call_reward(self.setup.reward_fn, b, prompt, tok.decode(ids), rec.label))
        return torch.tensor(out, device=self.device)

    def _micro_indices(self, n: int) -> list[torch.Tensor]:
        m = self.config.ppo.micro_batch_size
        return [torch.arange(i, min(i + m, n)) for i in range(0, n, m)]

    @torch.no_grad()
    def infer(self, batch: RolloutBatch):
        temp = self.config.generation.temperature
        self.actor.eval()
        self.critic.eval()
        outs = {"old": [], "ref": [], "val": []}
        for idx in self._micro_indices(len(batch)):
            mb = batch.select(idx.to(self.device))
            r = batch.response_mask.shape[1]
            pad = (lambda x: torch.nn.functional.pad(x.float(), (0, r - x.shape[1])))
            outs["old"].append(pad(response_logprobs(self.actor, mb, temp)))
            outs["ref"].append(pad(response_logprobs(self.ref, mb, temp)))
            outs["val"].append(pad(response_values(self.critic, mb)))
        return tuple(torch.cat(outs[k]) for k in ("old", "ref", "val"))

    def train(self, batch, old_logp, old_values, advantages, returns) -> dict:
        c = self.config.ppo
        temp = self.config.generation.temperature
        self.actor.train()
        self.critic.train()
        gen = torch.Generator().manual_seed(self.config.trainer.seed * 7919 + self.iteration)
        stats: dict[str, list[float]] = {}
        n_micro = c.mini_batch_size // c.micro_batch_size
        for _ in range(c.ppo_epochs):
            # Drawn on the CPU generator (the same shuffle on every device), then moved.
            perm = torch.randperm(len(batch), generator=gen).to(self.device)
            for start in range(0, len(batch), c.mini_batch_size):
                mini = perm[start:start + c.mini_batch_size]
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                for k in range(0, len(mini), c.micro_batch_size):
                    idx = mini[k:k + c.micro_batch_size]
                    mb = batch.select(idx)
                    r = mb.response_mask.shape[1]
                    mask = mb.response_mask
                    logp = response_logprobs(self.actor, mb, temp)
                    pg, pg_stats = ppo.policy_loss(logp, old_logp[idx, :r], advantages[idx, :r],
                                                   mask, c.clip_ratio)
                    loss = pg
                    if c.entropy_coef:
                        ent = self._entropy(mb)
                        loss = loss - c.entropy_coef * ent
                        pg_stats["entropy"] = float(ent)
                    (loss / n_micro).backward()
                    v = response_values(self.critic, mb)
                    vf, vf_stats = ppo.value_loss(v, old_values[idx, :r], returns[idx, :r], mask,
                                                  c.value_clip)
                    (vf / n_micro).backward()
                    for k2, v2 in pg_stats.items():
                        stats.setdefault(f"actor/{k2}", []).append(v2)
                    stats.setdefault("critic/vf_loss", []).append(vf_stats["vf_loss"])
                    stats.setdefault("critic/vf_clipfrac", []).append(vf_stats["clipfrac"])
                stats.setdefault("actor/grad_norm", []).append(self._clip(self.actor))
                stats.setdefault("critic/grad_norm", []).append(self._clip(self.critic))
                self.actor_opt.step()
                self.critic_opt.step()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _entropy(self, mb: RolloutBatch) -> torch.Tensor:
        from fusedrl.models.llama import gather_logits

        logits = gather_logits(self.actor(mb.input_ids), self.actor.tp_group)
        idx = mb.predictor_index()
        picked = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
        ent = ppo.entropy_from_logits(picked.float() / self.config.generation.temperature)
        return ppo.masked_mean(ent, mb.response_mask)

    def _clip(self, model) -> float:
        clip = self.config.ppo.grad_clip
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return float(norm)

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Optimizer states, KL controller, iteration (weights are saved separately)."""
        return {
            "iteration": self.iteration,
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, out) -> None:
        from fusedrl.checkpointing import save_training_checkpoint

        save_training_checkpoint(out, self)

    def load_checkpoint(self, path) -> None:
        from fusedrl.checkpointing import load_training_checkpoint

        load_training_checkpoint(path, self)

    def close(self) -> None:
        """Stop the generation backend (the Ray trainer also stops its workers)."""
        self.engine.stop()

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["torch_rng"])

