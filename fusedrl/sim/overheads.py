"""The runtime's own overheads, beyond the kernels the roofline prices.

The roofline (:mod:`fusedrl.sim.roofline`) is calibrated on the bare engine: a
prefill, a decode step, a forward, a forward/backward, each timed in one process.
The Ray runtime (:mod:`fusedrl.runtime`) adds work around those kernels: a Ray
dispatch and result fetch per model function call, token ids and per-token
scalars through the controller, per-micro-batch Python work on the workers
(``batch.select``, the PPO loss heads, the pipeline loop), the gradient
all-reduce on gloo plus clipping and the optimizer step per mini-batch, and
per engine step the generation loop of a worker sharing its core with the
controller and the other workers. :class:`RuntimeOverheads` holds those as
explicit terms; :func:`profile_runtime` measures them with a small profile of
the real runtime (fixed synthetic shapes, not the runs they are later compared
with): each stage call at two sizes, once through the runtime and once as the
bare kernels in this process; the difference at the two sizes gives a per-call
and a per-unit term.

Defaults are 0 (GPU-scale runs: the cluster defaults of the roofline already
carry a per-call ``overhead_*_s``; measure these for a real deployment).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass(frozen=True)
class RuntimeOverheads:
    """Time the runtime spends beyond the roofline's kernels, per unit of work.

    How :class:`fusedrl.sim.iteration.IterationSimulator` uses them (``n_inf`` =
    inference forwards per sample, 3: old log-probs, reference, values; ``m`` =
    micro-batches per dp rank; ``steps`` = optimizer steps per model):

    * gen stage: ``+ gen_call_s``, and every engine step (prefill or decode) of a
      generation instance costs ``+ engine_step_s`` (added to the roofline's
      per-call prefill/decode overhead, so it enters the scheduler's cost model);
    * inference stage: ``+ infer_call_s + n_inf * ceil(B / (micro * dp)) *
      infer_microbatch_s``;
    * train stage: every pipeline stage's forward of a micro-batch ``+
      train_microbatch_s`` (per model; with pp=1 that is ``2 * steps * m *
      train_microbatch_s``), and ``+ train_call_s + 2 * steps * optimizer_step_s``.
    """

    gen_call_s: float = 0.0
    """Per generation stage: dispatch, requests and samples through the controller."""
    engine_step_s: float = 0.0
    """Per engine step (prefill or decode) of a generation instance in the runtime."""
    infer_call_s: float = 0.0
    """Per inference stage (its concurrent log-prob/value calls and their results)."""
    infer_microbatch_s: float = 0.0
    """Per micro-batch per inference model on a dp rank (select, head, pipeline loop)."""
    train_call_s: float = 0.0
    """Per training stage (actor and critic calls, batch and data through Ray)."""
    train_microbatch_s: float = 0.0
    """Per micro-batch per trained model on each stage (select, PPO loss, 1F1B loop)."""
    optimizer_step_s: float = 0.0
    """Per model per mini-batch beyond the roofline: gloo gradient all-reduce, clip,
    and the optimizer step's Python work."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RuntimeOverheads.{f.name} must be a finite number >= 0, "
                                 f"got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _two_point(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """Intercept and slope of the line through two points, both clamped at >= 0."""
    slope = max(0.0, (y2 - y1) / (x2 - x1))
    return max(0.0, y1 - slope * x1), slope


def profile_runtime(preset: str, *, devices: int = 2, micro_batch_size: int = 8,
                    prompt_len: int = 6, gen_lengths: tuple[int, int] = (8, 40),
                    repeats: int = 2, seed: int = 0) -> tuple[RuntimeOverheads, dict]:
    """Measure :class:`RuntimeOverheads` on the real runtime (``DistributedPPOTrainer``,
    ``devices`` Ray workers, every call on ``dp=devices``) against the bare kernels
    in this process (one thread, like one emulated device).

    * gen: ``2 * devices`` requests forced to ``K`` tokens for both ``K`` in
      ``gen_lengths``; runtime minus bare engine (one replica's requests) is
      ``gen_call_s + K * engine_step_s``.
    * inference: ``u`` = 1 and 2 micro-batches per rank, runtime ``infer`` (3
      concurrent calls) minus 3 bare forwards per micro-batch is ``infer_call_s +
      3 u infer_microbatch_s``.
    * train: (mini-batches, micro-batches each) = (1, 1), (1, 2), (2, 1) per rank,
      runtime ``train`` minus bare forward/backward of actor and critic per micro-batch
      and an AdamW step per model per mini-batch; solved for ``train_call_s``,
      ``train_microbatch_s`` and ``optimizer_step_s``.

    Returns the overheads and the raw timings.
    """
    import torch

    from fusedrl.config import load_config
    from fusedrl.generation.engine import GenerationEngine, Request
    from fusedrl.generation.sampling import SamplingParams
    from fusedrl.models.build import build_model
    from fusedrl.rollout import RolloutBatch
    from fusedrl.runtime.launch import make_trainer
    from fusedrl.runtime.stages import RayRollout
    from fusedrl.update import minibatch_schedule
    from fusedrl.sim.calibration import best_time

    k1, k2 = gen_lengths
    mb = micro_batch_size
    n_gen = max(2 * devices * mb, 2 * devices)
    cfg = load_config(None, [
        f"model.preset={preset}", f"cluster.devices={devices}",
        f"placement.default=dp{devices}tp1pp1@0-{devices - 1}", "fusion.interstage=false",
        f"ppo.rollout_batch_size={n_gen}", f"ppo.mini_batch_size={n_gen}",
        f"ppo.micro_batch_size={mb}", f"generation.max_new_tokens={k2}",
        f"data.max_prompt_len={max(prompt_len, 8)}", f"trainer.seed={seed}"])
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = make_trainer(cfg)
    rollout = RayRollout(trainer.stages.cluster, cfg, trainer.setup)
    update = trainer.stages.update
    raw: dict = {}
    try:
        mc = trainer.setup.model_config
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(1, mc.vocab_size, prompt_len).tolist() for _ in range(n_gen)]
        actor = build_model(mc, "lm", None, seed=seed)
        critic = build_model(mc, "value", None, seed=seed + 1)

        # -- generation
        excess_gen = {}
        samples = None
        for K in (k1, k2):
            reqs = [Request(i, list(p), max_new_tokens=K) for i, p in enumerate(prompts)]
            params = SamplingParams(max_new_tokens=K, ignore_eos=True, seed=seed)
            rollout.generate(reqs, params)  # warm-up
            rt = best_time(lambda: rollout.generate(reqs, params), repeats)
            one = reqs[::devices]
            actor.eval()

            def bare():
                with torch.no_grad():
                    eng = GenerationEngine(actor, max_batch_size=len(one),
                                           max_seq_len=prompt_len + K + 1)
                    eng.generate(one, params)

            bare()
            bt = best_time(bare, repeats)
            excess_gen[K] = rt - bt
            raw[f"gen/K={K}"] = {"runtime_s": rt, "bare_s": bt}
            if K == k2:
                samples = rollout.generate(reqs, params)
        gen_call, step = _two_point(k1, excess_gen[k1], k2, excess_gen[k2])

        batch = RolloutBatch.from_samples(samples, trainer.setup.tokenizer.pad_token_id)

        def sub(n):
            return batch.select(torch.arange(n))

        # -- inference
        excess_inf = {}
        for u in (1, 2):
            b = sub(u * mb * devices)
            rollout.infer(b)
            rt = best_time(lambda: rollout.infer(b), repeats)
            ids = b.input_ids[:mb]

            def bare_inf():
                with torch.no_grad():
                    for _ in range(u):
                        actor(ids), actor(ids), critic(ids)

            bare_inf()
            bt = best_time(bare_inf, repeats)
            excess_inf[u] = rt - bt
            raw[f"infer/u={u}"] = {"runtime_s": rt, "bare_s": bt}
        infer_call, infer_mb = _two_point(3, excess_inf[1], 6, excess_inf[2])

        # -- training: (mini-batches M, micro-batches per mini u) per rank
        opt_a = torch.optim.AdamW(actor.parameters(), lr=1e-6)
        opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-6)
        actor.train()
        critic.train()
        rows = []
        for M, u in ((1, 1), (1, 2), (2, 1)):
            n = M * u * mb * devices
            b = sub(n)
            R = b.response_mask.shape[1]
            data = {"old_logp": torch.zeros(n, R), "values": torch.zeros(n, R),
                    "advantages": torch.randn(n, R), "returns": torch.randn(n, R),
                    "response_mask": b.response_mask}
            trainer.config.ppo.mini_batch_size = u * mb * devices
            schedule = minibatch_schedule(n, trainer.config.ppo, seed, 0)
            update.train(b, data, schedule)
            rt = best_time(lambda: update.train(b, data, schedule), repeats)
            ids = b.input_ids[:mb]

            def bare_train():
                for _ in range(M):
                    for net, opt in ((actor, opt_a), (critic, opt_c)):
                        opt.zero_grad(set_to_none=True)
                        for _ in range(u):
                            net(ids).float().mean().backward()
                        opt.step()

            bare_train()
            bt = best_time(bare_train, repeats)
            rows.append((M, u, rt - bt))
            raw[f"train/M={M},u={u}"] = {"runtime_s": rt, "bare_s": bt}
        # excess = call + 2 M opt + 2 M u micro
        A = np.array([[1.0, 2 * M, 2 * M * u] for M, u, _ in rows])
        y = np.array([e for _, _, e in rows])
        call, opt, micro = (max(0.0, float(v)) for v in np.linalg.solve(A, y))
    finally:
        trainer.close()
        torch.set_num_threads(prev_threads)
    return RuntimeOverheads(gen_call_s=gen_call, engine_step_s=step, infer_call_s=infer_call,
                            infer_microbatch_s=infer_mb, train_call_s=call,
                            train_microbatch_s=micro, optimizer_step_s=opt), raw
