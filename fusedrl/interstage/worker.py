"""Worker side of inter-stage fusion (RLHFuse, arXiv 2409.13221 §4).

:class:`InterStageWorker` is mixed into :class:`fusedrl.runtime.worker.Worker`. It
exposes the native engine step by step, so that the controller
(:mod:`fusedrl.interstage.rollout`) can drive every generation instance over one
shared sample queue, stop a long-tail sample on one instance and resume it on
another, and run inference on single finished micro-batches on whichever device is
free:

- :meth:`gen_begin` starts the engine of a generation instance for one iteration;
- :meth:`gen_run` admits the requests the controller hands it (new ones from the
  shared queue, or migrated ones: ``Request.resume``) and runs up to ``k`` engine
  steps; it returns the samples that finished, what is still running (for the
  migration planner) and the timed decode steps (to calibrate ``GenCostModel``);
- :meth:`gen_migrate` (:mod:`fusedrl.interstage.kv_migration`) aborts a freed
  instance's samples and sends the KV caches of those that move by KV transfer to
  their destinations; :meth:`gen_run` receives them (``kv_in``) and decodes on;
- :meth:`gen_abort` aborts everything still generating and returns the partial
  samples (migration by re-prefill: the destination re-reads prompt + generated
  tokens and continues with the same per-sample random stream, so the tokens and
  log-probs are those of an unmigrated run);
- :meth:`infer_local` runs the inference models this device holds (reference
  log-probs, critic values, reward score, and the actor's old log-probs) on one
  micro-batch of finished samples.

Only instances of one device (``tp = pp = 1``) are driven this way: a step of a
tensor- or pipeline-parallel instance would be a collective of several workers
that the controller would have to keep in lock step.
"""

from __future__ import annotations

import time

import torch

from fusedrl.devices import timer
from fusedrl.interstage.kv_migration import KVMigrationWorker


class InterStageWorker(KVMigrationWorker):
    """Mixin of the Ray worker: step-level generation and per-micro-batch inference."""

    def serving_key(self, role: str) -> str:
        """The shard that serves ``role``'s inference on this device: a one-device copy
        received as a freed generation device (``role@device``) or the role's own."""
        key = f"{role}@{self.device}"
        if key in self.spec.serve:
            src = self.spec.serve[key][1]
            return src if src == "actor_gen" else key  # the generation copy itself
        return role

    def _single_device_shard(self, role: str):
        shard = self.shards[role]
        g = shard.groups
        if not (g.is_first and g.is_last and g.placement.layout.tp == 1):
            raise RuntimeError(f"inter-stage fusion drives {role} on device {self.device} "
                               f"step by step, which needs tp=pp=1 (placement "
                               f"{g.placement})")
        return shard

    def _gen_engine(self, role: str):
        self._single_device_shard(role)
        return self.generation_backend(role)

    def gen_begin(self, role: str, params) -> None:
        """Start this instance's engine for one iteration (it must hold no sample)."""
        self.kv_sends_wait()  # the last iteration's KV sends (received by then)
        self._gen_engine(role).start(params)

    def gen_run(self, role: str, requests: list, max_steps: int, kv_in: list = ()) -> dict:
        """Admit ``requests`` (and the migrated samples of the KV parcels ``kv_in``,
        received first: :mod:`fusedrl.interstage.kv_migration`) and run up to
        ``max_steps`` engine steps (fewer when the engine runs dry).

        Returns ``{"finished": [Sample], "running": [(sample_id, prompt_len,
        generated)], "decode": [(batch, mean_context, seconds)], "prefill": [(tokens,
        seconds)], "kv": [(bytes, seconds)], "resume_s", "busy_s"}``. ``decode`` holds
        the steps that admitted nothing (pure decode steps, the points of
        ``GenCostModel.fit``); ``prefill`` the steps that only admitted (nothing was
        decoding), with the tokens they prefilled; ``kv`` the KV transfers received
        (receive + import); ``resume_s`` (None unless migrated samples came) the
        seconds from the call's start to the end of its first step, the one that gives
        the migrated samples their next token (KV imported, or re-prefilled).
        """
        engine = self._gen_engine(role)
        max_batch = self.spec.config.generation.max_batch_size
        t_start, wall_start = time.perf_counter(), time.time()
        kv = self.kv_import(engine, kv_in) if kv_in else []
        engine.add(requests)
        migrated = bool(kv_in) or any(r.response_ids for r in requests)
        resume_s = None
        finished, decode, prefill = [], [], []
        for _ in range(max_steps):
            if not engine.has_unfinished():
                break
            progress = engine.progress()
            running = [p for p in progress if p.started]
            admits = [p for p in progress if not p.started][:max_batch - len(running)]
            # tokens in the KV cache: the last generated token is fed by this step
            context = sum(p.prompt_len + max(p.generated - 1, 0) for p in running)
            t0 = timer(self.torch_device)
            finished.extend(engine.step())
            dt = timer(self.torch_device) - t0  # the cost model's points: device time
            if migrated and resume_s is None:
                resume_s = time.perf_counter() - t_start
            if running and not admits:
                decode.append((len(running), context / len(running), dt))
            elif admits and not running:
                prefill.append((sum(p.prompt_len + p.generated for p in admits), dt))
        if decode or prefill or finished:
            self.events.add("gen", wall_start, time.time())
        states = [(p.sample_id, p.prompt_len, p.generated) for p in engine.progress()]
        return {"finished": finished, "running": states, "decode": decode, "prefill": prefill,
                "kv": kv, "resume_s": resume_s, "busy_s": time.perf_counter() - t_start}

    def gen_abort(self, role: str) -> list:
        """Abort every sample still in the engine; their partial samples (for
        ``Request.resume`` on the migration's destination)."""
        engine = self._gen_engine(role)
        return [engine.abort(p.sample_id) for p in engine.progress()]

    @torch.no_grad()
    def infer_local(self, jobs: list, samples: list, temperature: float) -> dict:
        """Run inference ``jobs`` (``[(role, kind)]``, kind ``logp``/``values``/``score``)
        on one micro-batch of finished ``samples`` with this device's own replicas.

        Returns ``{"results": {(role, kind): tensor}, "tokens", "busy_s"}``; per-token
        results are padded to the micro-batch's longest response (the controller pads
        them to the batch's).
        """
        from fusedrl.devices import to_host
        from fusedrl.packing import forward, pack
        from fusedrl.rollout import RolloutBatch, infer_head
        from fusedrl.runtime.worker import event_name

        t0 = time.perf_counter()
        mb = RolloutBatch.from_samples(samples, self.spec.pad_token_id).to(self.torch_device)
        if self.spec.config.ppo.packed:
            mb = pack(mb)
        width = mb.response_mask.shape[1]
        results = {}
        for role, kind in jobs:
            # this device's copy of the role: its own one-device replica, or the copy a
            # freed generation device received (``ref@1``)
            key = self.serving_key(role)
            shard = self._single_device_shard(key)
            with self.events.record(event_name(role, kind)):
                out = forward(shard.model, mb)
                results[(role, kind)] = infer_head(kind, out, mb, shard.model.tp_group, width,
                                                   temperature)
        return {"results": to_host(results), "tokens": mb.num_tokens(),
                "busy_s": time.perf_counter() - t0}
