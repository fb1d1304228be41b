"""The PPO iteration, written once, over pluggable stages (:mod:`fusedrl.stages`).

One iteration::

    prompts -> Rollout: generate (actor_gen) and infer: old log-probs (actor_infer),
               ref log-probs, values (critic_infer), reward-model scores
            -> rule rewards (reward.function / the task's) where no reward model
            -> token rewards (KL-penalised) -> GAE -> whitening
            -> Update: PPO epochs of actor and critic -> WeightSync: new weights out

The single-device trainer and the Ray runtime are the same :class:`Trainer` with other
stages (:func:`fusedrl.runtime.launch.make_trainer` builds them).

Every random choice is a function of (seed, iteration) or (seed, sample id): prompt
order, sampling streams and mini-batch shuffles. A run resumed from a checkpoint
therefore repeats the uninterrupted run's next iteration exactly.

Device: the iteration's tensors live on ``Trainer.device`` (the single device's, or the
CPU of the Ray controller). Random draws that fix the run (initialisation, shuffles,
sampling streams) are made on the CPU, so a seed gives the same run on every device up
to float rounding. Timing has one owner: the per-device events of every model call
(:mod:`fusedrl.timeline`), from which the stage times and the device utilization of
each iteration are derived.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from fusedrl import dapo
from fusedrl.algorithms import ppo
from fusedrl.algorithms.rewards import call_reward, load_reward_fn
from fusedrl.config import Config
from fusedrl.data.prompts import PromptRecord, load_prompts
from fusedrl.generation import Request, SamplingParams, forced_lengths
from fusedrl.models.checkpoint import load_checkpoint
from fusedrl.models.config import PRESETS, ModelConfig
from fusedrl.models.hub import resolve_model_path
from fusedrl.models.tokenizer import CharTokenizer, load_hf_tokenizer
from fusedrl.perf import iteration_mfu
from fusedrl.rollout import RolloutBatch
from fusedrl.stages import Rollout, RolloutOutput, Update, WeightSync
from fusedrl.timeline import DeviceEvent, device_utilization, stage_overlap, stage_spans
from fusedrl.update import inference_micro_batches, minibatch_schedule, pad_ratio, seq_lengths


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
    val_prompts: list[PromptRecord] = field(default_factory=list)
    val_prompt_ids: list[list[int]] = field(default_factory=list)


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
    prompt_ids = _render(prompts, tokenizer, config, "prompt")
    val_prompts: list[PromptRecord] = []
    if config.data.val_path:
        val_prompts = load_prompts(config.data.val_path, config.data.prompt_key,
                                   config.data.label_key)
    elif task is not None and (config.trainer.val_every or config.trainer.val_before_train):
        # a held-out split: the task's generator with another seed
        val_prompts = task.build(config.data.val_size, config.trainer.seed + 7_777_777)
    val_prompt_ids = _render(val_prompts, tokenizer, config, "validation prompt")
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
                 critic_state, val_prompts=val_prompts, val_prompt_ids=val_prompt_ids)


def _render(records: list[PromptRecord], tokenizer, config: Config, what: str) -> list:
    out = []
    for i, rec in enumerate(records):
        ids = tokenizer.render_prompt(rec.prompt, config.data.chat_template)
        if len(ids) > config.data.max_prompt_len:
            raise ValueError(f"{what} {i} has {len(ids)} tokens, more than config key "
                             f"data.max_prompt_len={config.data.max_prompt_len}")
        out.append(ids)
    return out


@dataclass
class Stages:
    """The stages of a run and what the trainer needs from the runtime around them."""

    rollout: Rollout
    update: Update
    weight_sync: WeightSync
    take_events: Callable[[], list[DeviceEvent]]
    """Every device's events since the last call (one per model call)."""
    devices: list[int]
    runtime: str
    """``single`` or ``ray`` (recorded in checkpoints)."""
    placements: dict[str, str] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    """Where the iteration's tensors live."""
    close: Callable[[], None] = lambda: None
    models: object = None
    """The single-device models (:class:`fusedrl.local.LocalModels`), or None."""
    cluster: object = None
    """The Ray workers (:class:`fusedrl.runtime.cluster.RayCluster`), or None."""
    peak_memory: Callable[[], dict] = dict
    """Peak memory metrics of the processes that hold the models."""


class Trainer:
    """PPO, one iteration at a time, over ``stages``.

    Protocol used by ``fusedrl train``: ``step() -> metrics``, ``iteration``,
    ``save_checkpoint(out)``, ``load_checkpoint(path)``, ``close()``; after each step
    ``last_events`` holds its per-device events and ``last_window`` its wall-clock
    ``(start, end)``.
    """

    def __init__(self, config: Config, setup: Setup, stages: Stages):
        self.config, self.setup, self.stages = config, setup, stages
        c = config
        self.device = stages.device
        self.kl_ctl = (ppo.AdaptiveKLController(c.ppo.kl_coef, c.ppo.target_kl, c.ppo.kl_horizon)
                       if c.ppo.adaptive_kl else ppo.FixedKLController(c.ppo.kl_coef))
        # Imported here, after the generation backend started: vLLM 0.32's triton kernel
        # dispatcher scans every loaded module at start-up and fails on llvmlite's
        # (numba's) function wrappers (the gae estimator imports numba).
        from fusedrl.algorithms.advantages import get_adv_estimator

        self.estimator = get_adv_estimator(c.algorithm.adv_estimator)
        self.iteration = 0  # iterations completed
        self.last_events: list[DeviceEvent] = []
        self.last_window = (0.0, 0.0)
        self.last_samples: list[dict] = []  # trainer.log_samples of the last step
        self.last_val_samples: list[dict] = []
        from fusedrl.partial import PartialRollouts
        from fusedrl.scheduler.partial import is_partial

        # fusion.interstage_policy: partial -- samples carried across iterations
        self.partial = PartialRollouts(c) if is_partial(c.fusion.interstage_policy) else None

    # ------------------------------------------------------------------ data

    def prompt_indices(self, iteration: int) -> list[int]:
        """Prompts of ``iteration``: epochs over a per-epoch shuffle of the dataset."""
        b = self.config.ppo.rollout_batch_size
        return self.stream_rows(range(iteration * b, (iteration + 1) * b))

    def stream_rows(self, positions) -> list[int]:
        """Dataset rows at positions of the data stream (position ``k``: the ``k``-th
        prompt trained on without partial rollouts; with them, the ``k``-th launched)."""
        n = len(self.setup.prompts)
        orders: dict[int, list[int]] = {}  # one shuffle per epoch the positions touch
        out = []
        for k in positions:
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
        """The iteration's samples on dataset rows ``prompts``: ``actor.rollout_n`` per
        prompt (a group, consecutive); ids are global so every sample has its own
        stream."""
        g = self.config.generation
        n = self.config.actor.rollout_n
        rows = [i for i in prompts for _ in range(n)]
        b = len(rows)
        forced = [None] * b
        if g.forced_lengths:
            forced = forced_lengths(g.forced_lengths, b,
                                    seed=self.config.trainer.seed * 1_000_003 + iteration,
                                    max_len=g.max_new_tokens)
        return [Request(iteration * b + j, list(self.setup.prompt_ids[i]), max_new_tokens=m)
                for j, (i, m) in enumerate(zip(rows, forced))]

    def stream_requests(self, iteration: int, first: int, count: int) -> list[Request]:
        """Partial rollouts: the requests of ``count`` groups at data-stream positions
        ``first..``, launched in ``iteration``; ids as :meth:`requests` gives them
        (``position * rollout_n + k``)."""
        g, n = self.config.generation, self.config.actor.rollout_n
        forced = [None] * (count * n)
        if g.forced_lengths:
            forced = forced_lengths(g.forced_lengths, count * n,
                                    seed=self.config.trainer.seed * 1_000_003 + iteration,
                                    max_len=g.max_new_tokens)
        rows = self.stream_rows(range(first, first + count))
        return [Request((first + p) * n + k, list(self.setup.prompt_ids[i]),
                        max_new_tokens=forced[p * n + k])
                for p, i in enumerate(rows) for k in range(n)]

    # ------------------------------------------------------------- iteration

    def step(self) -> dict:
        """Run one PPO iteration; returns its metrics (verl's names)."""
        c, s, st = self.config, self.setup, self.stages
        it = self.iteration
        wall: dict[str, float] = {}
        t_step = time.time()

        # 1. generate and infer (fused or not: the rollout stage decides)
        t0 = time.time()
        stale = None  # partial rollouts: tokens sampled by older weights
        if self.partial is None:
            idx = self.prompt_indices(it)
            out: RolloutOutput = st.rollout.run(self.requests(it, idx), self.sampling_params())
        else:  # weight version = iteration (updates so far)
            requests, close = self.partial.begin(
                it, lambda first, count: self.stream_requests(it, first, count))
            out = st.rollout.run(requests, self.sampling_params(), close=close)
            stale, partial_metrics = self.partial.end(out, it)
            out.metrics.update(partial_metrics)
            ids = out.batch.sample_ids.tolist()
            idx = self.stream_rows([sid // c.actor.rollout_n for sid in ids[::c.actor.rollout_n]])
        wall["rollout"] = time.time() - t0
        batch = out.batch if out.batch.input_ids.device == self.device else \
            out.batch.to(self.device)
        n = c.actor.rollout_n
        scores = out.scores if out.scores is not None else \
            self.rule_scores(batch, [s.prompts[i] for i in idx for _ in range(n)])
        old_logp, ref_logp = out.old_logp.to(self.device), out.ref_logp.to(self.device)
        values = out.values.to(self.device) if out.values is not None else None
        scores = scores.to(self.device)
        dapo_metrics = {}
        if c.reward.overlong_buffer.enable or c.algorithm.filter_groups.enable:
            t0 = time.time()  # DAPO: overlong penalty, groups dropped and refilled
            batch, old_logp, ref_logp, values, scores, idx, dapo_metrics = dapo.apply(
                self, it, batch, old_logp, ref_logp, values, scores, idx)
            wall["rollout"] += time.time() - t0
        if c.trainer.log_samples:
            self.last_samples = self.sample_rows(
                batch, [s.prompts[i] for i in idx for _ in range(n)], scores,
                c.trainer.log_samples)

        # 2. advantages: the estimator (algorithm.adv_estimator) over token rewards; the
        # KL to the reference is a reward penalty (PPO) unless it is a loss term (GRPO)
        t0 = time.time()
        mask = batch.response_mask
        kl_coef = 0.0 if c.actor.use_kl_loss else self.kl_ctl.value
        rewards = ppo.token_level_rewards(scores, old_logp, ref_logp, mask, kl_coef,
                                          c.ppo.kl_estimator)
        index = torch.arange(len(idx), device=self.device).repeat_interleave(n)  # group ids
        advantages, returns = self.estimator(
            rewards, mask, index, values=values, gamma=c.ppo.gamma, lam=c.ppo.lam,
            norm_adv_by_std_in_grpo=c.algorithm.norm_adv_by_std_in_grpo,
            whiten=c.ppo.whiten_advantages)
        kl = ppo.masked_mean(ppo.kl_penalty(old_logp, ref_logp, c.ppo.kl_estimator), mask)
        wall["adv"] = time.time() - t0

        # 3. update, then the new weights to the calls that use them
        st.weight_sync.before_update()
        t0 = time.time()
        targets = {"old_logp": old_logp, "advantages": advantages, "returns": returns,
                   "response_mask": mask}
        if values is not None:
            targets["values"] = values
        if c.actor.use_kl_loss:
            targets["ref_logp"] = ref_logp
        if stale is not None and bool(stale.any()):
            from fusedrl.partial import behaviour_logp

            targets["behav_logp"] = behaviour_logp(old_logp, batch.gen_logprobs, stale)
        lengths = seq_lengths(batch).cpu()
        schedule = minibatch_schedule(len(batch), c.ppo, c.trainer.seed, it, lengths)
        train_stats = st.update.train(batch, targets, schedule)
        wall["train"] = time.time() - t0
        t0 = time.time()
        sync_metrics = st.weight_sync.after_update()
        wall["realloc"] = time.time() - t0
        self.kl_ctl.update(float(kl), len(batch))
        t_end = time.time()

        events = st.take_events()
        self.last_events, self.last_window = events, (t_step, t_end)
        spans = stage_spans(events)
        timing = {"gen": spans.get("gen", 0.0), "inference": spans.get("inference", 0.0),
                  "rollout": wall["rollout"], "adv": wall["adv"], "train": wall["train"],
                  "realloc": wall["realloc"], "step": t_end - t_step}
        gen_inf = stage_overlap(events, "gen", "inference")
        if gen_inf is not None:
            timing["gen_inference_overlap"] = gen_inf
        # verl's per-call timings: the seconds the busiest device spent in each call
        for name, calls in CALL_TIMINGS.items():
            busy = call_seconds(events, calls)
            if busy is not None:
                timing[name] = busy

        self.iteration += 1
        rlen, plen = batch.response_lens.float(), batch.prompt_lens.float()
        extra = {"actor/lr": c.ppo.actor_lr,
                 "prompt_length/mean": float(plen.mean()),
                 "prompt_length/max": float(plen.max()),
                 "prompt_length/min": float(plen.min())}
        if values is not None:
            extra["critic/lr"] = c.ppo.critic_lr
            extra["critic/vf_explained_var"] = explained_variance(values, returns, mask)
        metrics = {
            "iteration": self.iteration,
            "critic/score/mean": float(scores.mean()),
            "critic/score/max": float(scores.max()),
            "critic/score/min": float(scores.min()),
            **({"critic/values/mean": float(ppo.masked_mean(values, mask))}
               if values is not None else {}),
            "critic/advantages/mean": float(ppo.masked_mean(advantages, mask)),
            "critic/returns/mean": float(ppo.masked_mean(returns, mask)),
            "actor/reward_kl_penalty": float(kl),
            "actor/kl_coef": float(self.kl_ctl.value),
            "response_length/mean": float(rlen.mean()),
            "response_length/max": float(rlen.max()),
            "response_length/clip_ratio": float(
                (batch.response_lens >= c.generation.max_new_tokens).float().mean()),
            "rollout/logprob_diff_max": float(  # tokens the current weights sampled
                ((batch.gen_logprobs - old_logp).abs() * mask *
                 (1.0 if stale is None else (~stale).to(mask))).max()),
            **extra,
            **dapo_metrics,
            **train_stats,
            **out.metrics,
            **sync_metrics,
            **{f"timing_s/{k}": v for k, v in timing.items()},
            "perf/total_num_tokens": batch.num_tokens(),
            "perf/throughput": batch.num_tokens() / timing["step"],
            "perf/device_utilization": device_utilization(events, st.devices, t_step, t_end),
            # computed (packed or padded) / real tokens of the micro-batches the calls
            # ran (1.0: no padding)
            "perf/pad_ratio/inference": pad_ratio(inference_micro_batches(batch, c.ppo),
                                                  lengths, c.ppo.packed),
            "perf/pad_ratio/train": pad_ratio([i for mb in schedule for i in mb], lengths,
                                              c.ppo.packed),
            **st.peak_memory(),
            # model FLOPs over busy seconds x devices x peak (fusedrl/perf.py)
            **iteration_mfu(c, s.model_config, batch.num_tokens(), timing, st.placements,
                            self.device),
        }
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        """``val/score/mean`` (and max, min, response length) of the current policy on the
        validation prompts, generated on the generation placement (greedy unless
        ``trainer.val_greedy`` is false). Sample streams of validation never meet
        training's (ids from 2^40 up)."""
        s, c = self.setup, self.config
        if not s.val_prompts:
            return {}
        params = self.sampling_params()
        if c.trainer.val_greedy:
            params = replace(params, temperature=0.0, top_k=0, top_p=1.0)
        requests = [Request((1 << 40) + self.iteration * len(s.val_prompts) + j, list(ids))
                    for j, ids in enumerate(s.val_prompt_ids)]
        samples = self.stages.rollout.generate(requests, params)
        batch = RolloutBatch.from_samples(samples, s.tokenizer.pad_token_id)
        if c.reward.type == "model":
            scores = self.stages.rollout.run(requests, params).scores
        else:
            scores = self.rule_scores(batch, s.val_prompts)
        self.last_val_samples = self.sample_rows(batch, s.val_prompts, scores)
        self.stages.take_events()  # not part of the next iteration's timeline
        out = {"val/score/mean": float(scores.mean()), "val/score/max": float(scores.max()),
               "val/score/min": float(scores.min()),
               "val/response_length/mean": float(batch.response_lens.float().mean())}
        # per data source, as verl's val-core/<data_source>/reward/mean@1
        sources = [r.data_source for r in s.val_prompts]
        if any(src is not None for src in sources):
            for src in sorted({x if x is not None else "unknown" for x in sources}):
                rows = [b for b, x in enumerate(sources) if (x or "unknown") == src]
                out[f"val/{src}/score/mean"] = float(scores[rows].mean())
        return out

    def decoded(self, batch: RolloutBatch, records: list[PromptRecord],
                limit: int | None = None) -> list[tuple[str, str]]:
        """``(prompt text, response text)`` of the first ``limit`` rows, the response
        without its stop tokens. Token ids are read in Python: one copy to the host, not
        one per row."""
        tok = self.setup.tokenizer
        responses, mask = batch.response_ids().cpu(), batch.response_mask.cpu()
        out = []
        for b in range(min(len(records), limit if limit is not None else len(records))):
            ids = [t for t in responses[b][mask[b] > 0].tolist() if t not in tok.eos_token_ids]
            prompt = records[b].prompt
            out.append((prompt if isinstance(prompt, str) else prompt[-1]["content"],
                        tok.decode(ids)))
        return out

    def sample_rows(self, batch: RolloutBatch, records: list[PromptRecord], scores,
                    limit: int | None = None) -> list[dict]:
        """``{"prompt", "response", "score"}`` of the first ``limit`` rows, decoded."""
        return [{"prompt": prompt, "response": response, "score": float(scores[b])}
                for b, (prompt, response) in enumerate(self.decoded(batch, records, limit))]

    def rule_scores(self, batch: RolloutBatch, records: list[PromptRecord]) -> torch.Tensor:
        """Rule rewards: ``reward_fn(prompt, response, label)`` per sample, checked
        (:func:`fusedrl.algorithms.rewards.call_reward`)."""
        out = [call_reward(self.setup.reward_fn, b, prompt, response, rec.label)
               for b, ((prompt, response), rec) in enumerate(
                   zip(self.decoded(batch, records), records))]
        return torch.tensor(out, device=self.device)

    # ------------------------------------------------------------- state

    @property
    def runtime(self) -> str:
        return self.stages.runtime

    def state_dict(self) -> dict:
        """Iteration, KL controller, RNG (weights and optimizer states: the update's)."""
        return {"iteration": self.iteration, "kl_ctl": self.kl_ctl.state_dict(),
                "torch_rng": torch.get_rng_state(), "runtime": self.stages.runtime,
                "placements": dict(self.stages.placements),
                # partial rollouts: the carried samples survive a checkpoint
                **({"partial": self.partial.state_dict()} if self.partial else {})}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["torch_rng"])
        if self.partial is not None:
            if "partial" not in state:
                raise ValueError("checkpoint has no partial-rollout state: it was written "
                                 "without fusion.interstage_policy=partial")
            self.partial.load_state_dict(state["partial"])

    def save_checkpoint(self, out):
        from fusedrl.checkpointing import save_training_checkpoint

        return save_training_checkpoint(out, self)

    def load_checkpoint(self, path) -> None:
        from fusedrl.checkpointing import load_training_checkpoint

        load_training_checkpoint(path, self)

    def close(self) -> None:
        """Stop the stages and the runtime (workers, Ray if this run started it)."""
        self.stages.close()


CALL_TIMINGS = {"old_log_prob": ("logp:actor_infer",), "ref": ("logp:ref",),
                "values": ("values",), "reward": ("score",),
                "update_actor": ("train:actor", "F:actor", "B:actor"),
                "update_critic": ("train:critic", "F:critic", "B:critic")}
"""verl's ``timing_s/<name>`` and the timeline's calls it spans."""


def call_seconds(events: list[DeviceEvent], calls: tuple[str, ...]) -> float | None:
    """Seconds the busiest device spent in ``calls`` (their events summed per device;
    None: no such event). Calls interleave (per micro-batch on one device, with other
    calls under fusion), so a first-to-last span would overstate them."""
    per_device: dict[int, float] = {}
    for e in events:
        if e.call in calls:
            per_device[e.device] = per_device.get(e.device, 0.0) + (e.end - e.start)
    return max(per_device.values()) if per_device else None


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over response tokens (verl's
    ``critic/vf_explained_var``): 1 is a perfect critic, 0 a constant one."""
    var_r = ppo.masked_var(returns, mask)
    return float(1.0 - ppo.masked_var(returns - values, mask) / (var_r + 1e-8))
