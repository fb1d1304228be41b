"""Partial rollouts in the runtime (``fusion.interstage_policy: partial``).

The policy (:class:`fusedrl.scheduler.partial.PartialRolloutPolicy`) decides; this
module keeps the state across iterations and hands the rollout stage what it needs:

- :class:`PartialRollouts` (the trainer's, and the benchmark's): before an iteration,
  :meth:`~PartialRollouts.begin` restarts the carried samples that became too stale,
  orders them first and launches new groups from the data stream; after it,
  :meth:`~PartialRollouts.end` records which tokens each sample got from which weight
  version, carries the unfinished samples over and returns the stale-token mask the
  loss needs (behaviour log-probs) and the metrics. Its state goes into checkpoints
  (:meth:`~PartialRollouts.state_dict`): the carried samples survive a resume, which
  then repeats the uninterrupted run (a carried sample is resumed by re-prefill of
  prompt + generated tokens under the weights of the new iteration in both cases, and
  its random stream is indexed by token position).
- :class:`BatchClose` and :class:`GroupTracker` (the rollout stage's): a rollout run
  with a ``close`` streams a group (a prompt's ``actor.rollout_n`` samples) on when its
  last sample finishes, stops generating once ``target`` groups are complete, aborts
  what is still generating and returns it in ``RolloutOutput.carried``. A carried
  sample at the staleness bound cannot be carried again: its group is in the batch,
  which waits for it (the long tail gets ``max_staleness + 1`` iterations, not one).

Weight version ``v`` means the weights after ``v`` updates (the trainer's iteration
number when it generates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fusedrl.generation.engine import Request, Sample

ABORTED = "aborted"


@dataclass
class BatchClose:
    """How a rollout closes its batch early (partial rollouts)."""

    group_size: int
    """Samples per group (``actor.rollout_n``); group of sample ``i`` is ``i // group_size``
    (the trainer's ids: ``stream position * rollout_n + k``)."""
    target: int
    """Groups in the batch: generation stops once this many groups are complete."""
    finished: list = field(default_factory=list)
    """Carried samples that already finished (waiting for their group): inference only."""
    must: set = field(default_factory=set)
    """Groups at the staleness bound: in the batch, which does not close without them."""


class GroupTracker:
    """Counts finished samples per group and says when the batch is closed.

    The batch is the ``must`` groups plus the first other groups to complete, ``target``
    groups in all. ``add(sample)`` returns the samples of the group it put in the batch
    (to stream to inference), or ``[]``; a complete group beyond the batch, and every
    sample finishing after the close, goes to ``overflow`` (carried over, finished)."""

    def __init__(self, close: BatchClose):
        if len(close.must) > close.target:
            raise ValueError(f"{len(close.must)} groups must finish, more than the batch's "
                             f"{close.target}")
        self.close = close
        self.partial_groups: dict[int, list] = {}
        self.batch: list = []  # samples of the batch's groups, in completion order
        self.overflow: list = []
        self.groups_done = 0  # groups in the batch
        self.free = close.target - len(close.must)  # places for groups not in ``must``

    @property
    def closed(self) -> bool:
        return self.groups_done >= self.close.target

    def start(self) -> list:
        """Feed the carried finished samples; the samples of groups they complete."""
        ready = []
        for s in self.close.finished:
            ready += self.add(s)
        return ready

    def add(self, sample) -> list:
        if sample.finish_reason == ABORTED:
            raise ValueError(f"sample {sample.sample_id}: an aborted sample is not finished")
        if self.closed:
            self.overflow.append(sample)
            return []
        g = sample.sample_id // self.close.group_size
        members = self.partial_groups.setdefault(g, [])
        members.append(sample)
        if len(members) < self.close.group_size:
            return []
        del self.partial_groups[g]
        if g not in self.close.must:
            if self.free == 0:  # the batch's other places are taken: carried, finished
                self.overflow += members
                return []
            self.free -= 1
        self.groups_done += 1
        self.batch += members
        return members

    def leftover(self) -> list:
        """Finished samples not in the batch (their group incomplete, or it closed)."""
        return [s for members in self.partial_groups.values() for s in members] + \
            self.overflow


def unstarted(request: Request) -> Sample:
    """A request that never reached an engine, as a carried (aborted) sample."""
    return Sample(request.sample_id, list(request.prompt_ids), list(request.response_ids),
                  list(request.logprobs), ABORTED, request.max_new_tokens)


def generate_until_closed(engine, requests: list, params, close: BatchClose
                          ) -> tuple[list, list]:
    """Generate ``requests`` on a step-level backend (``start/add/step/progress/abort``)
    until ``close.target`` groups are complete (carried finished samples count);
    returns ``(batch samples in sample-id order, carried samples)``. Requests are
    admitted in order, so carried samples resume first."""
    tracker = GroupTracker(close)
    tracker.start()
    engine.start(params)
    engine.add(requests)
    while not tracker.closed and engine.has_unfinished():
        for s in engine.step():
            tracker.add(s)
    if not tracker.closed:
        raise RuntimeError(f"partial rollout: {tracker.groups_done} of {close.target} groups "
                           "complete when generation ran out of samples")
    aborted = [engine.abort(p.sample_id) for p in engine.progress()]
    return sorted(tracker.batch, key=lambda s: s.sample_id), tracker.leftover() + aborted


class PartialRollouts:
    """The carried samples and data-stream cursor of a run with partial rollouts.

    Per iteration: ``requests, close = begin(version, new_requests)``; the rollout
    stage's ``run(requests, params, close=close)``; ``stale, metrics = end(out,
    version)``. ``new_requests(first, count)`` builds the requests of ``count`` groups
    at data-stream positions ``first..first+count-1``."""

    def __init__(self, config, policy=None):
        from fusedrl.scheduler.gen_cost import GenCostModel
        from fusedrl.scheduler.interstage import get_policy

        f = config.fusion
        self.policy = policy if policy is not None else get_policy(
            f.interstage_policy, cost=GenCostModel(), num_instances=1,
            max_batch=config.generation.max_batch_size, oversample=f.oversample,
            max_staleness=f.max_staleness)
        self.group_size = config.actor.rollout_n
        self.target = config.ppo.rollout_batch_size
        self.cursor = 0  # next data-stream position to launch
        self.carried: dict[int, Sample] = {}
        self.versions: dict[int, list[int]] = {}  # carried sample -> version of each token
        self._wasted = 0
        self._launched = 0

    # ------------------------------------------------------------ an iteration

    def begin(self, version: int, new_requests: Callable[[int, int], list[Request]]
              ) -> tuple[list[Request], BatchClose]:
        """The iteration's requests (carried ones first, oldest first; then new groups
        from the data stream) and its :class:`BatchClose`."""
        from fusedrl.scheduler.partial import CarriedSample

        self._wasted = 0
        for sid in list(self.carried):
            first = self.versions[sid][0] if self.versions[sid] else None
            if self.policy.too_stale(first, version):  # beyond fusion.max_staleness
                self._restart(sid)
        order = self.policy.carry_order([
            CarriedSample(sid, len(s.response_ids), self.versions[sid][0]
                          if self.versions[sid] else None) for sid, s in self.carried.items()])
        must = []  # groups at the staleness bound, oldest first; at most a batch of them
        for c in order:
            g = c.sample_id // self.group_size
            if self.policy.must_finish(c.first_version, version) and g not in must:
                must.append(g)
        for g in must[self.target:]:  # more than a batch can hold: restarted
            for sid in [sid for sid in self.carried if sid // self.group_size == g]:
                self._restart(sid)
        must = set(must[:self.target])
        carried_groups = len({sid // self.group_size for sid in self.carried})
        count = self.policy.launch(self.target, carried_groups)
        new = new_requests(self.cursor, count) if count else []
        if len(new) != count * self.group_size:
            raise ValueError(f"new_requests({self.cursor}, {count}) returned {len(new)} "
                             f"requests, expected {count * self.group_size}")
        self.cursor += count
        self._launched = len(new)
        resumed = [Request.resume(self.carried[c.sample_id]) for c in order
                   if self.carried[c.sample_id].finish_reason == ABORTED]
        finished = [self.carried[c.sample_id] for c in order
                    if self.carried[c.sample_id].finish_reason != ABORTED]
        return resumed + new, BatchClose(self.group_size, self.target, finished, must)

    def _restart(self, sid: int) -> None:
        """Carried sample ``sid`` starts again from its prompt; its tokens are wasted."""
        s = self.carried[sid]
        self._wasted += len(s.response_ids)
        self.carried[sid] = Sample(sid, s.prompt_ids, [], [], ABORTED, s.max_new_tokens)
        self.versions[sid] = []

    def end(self, out, version: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Record the iteration's outcome: ``out`` (a ``RolloutOutput``) holds the batch
        and, in ``out.carried``, every other sample. Returns the [B, R] mask of the
        batch's response tokens sampled by older weights (their behaviour log-probs
        differ from the current policy's) and the ``partial/*`` metrics."""
        batch = out.batch
        ids = batch.sample_ids.tolist()
        lens = batch.response_lens.tolist()
        stale = torch.zeros(batch.response_mask.shape, dtype=torch.bool)
        staleness = []
        for b, (sid, n) in enumerate(zip(ids, lens)):
            prefix = self.versions.pop(sid, [])
            self.carried.pop(sid, None)
            if len(prefix) > n:
                raise RuntimeError(f"sample {sid}: {n} tokens, fewer than the {len(prefix)} it "
                                   "was carried with")
            stale[b, :len(prefix)] = True  # carried tokens: sampled by older weights
            staleness.append(version - prefix[0] if prefix else 0)
        carried_ids = set()
        for s in out.carried:
            prefix = self.versions.get(s.sample_id, [])
            if len(s.response_ids) < len(prefix):
                raise RuntimeError(f"sample {s.sample_id}: carried with fewer tokens than it had")
            self.versions[s.sample_id] = prefix + [version] * (len(s.response_ids) - len(prefix))
            self.carried[s.sample_id] = s
            carried_ids.add(s.sample_id)
        lost = set(self.carried) - carried_ids
        if lost:  # every sample in flight is either in the batch or carried over
            raise RuntimeError(f"partial rollout lost samples {sorted(lost)[:5]}")
        real = float(batch.response_mask.sum())
        metrics = {
            "partial/launched": float(self._launched),
            "partial/carried": float(len(self.carried)),
            "partial/carried_tokens": float(sum(len(s.response_ids)
                                                for s in self.carried.values())),
            "partial/staleness/mean": sum(staleness) / max(1, len(staleness)),
            "partial/staleness/max": float(max(staleness, default=0)),
            "partial/stale_token_frac": float((stale & (batch.response_mask.cpu() > 0)).sum())
            / max(real, 1.0),
            "partial/tokens_wasted": float(self._wasted),
        }
        return stale, metrics

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Cursor and carried samples (plain lists: tokens, log-probs, versions)."""
        return {"cursor": self.cursor,
                "carried": [(s.sample_id, list(s.prompt_ids), list(s.response_ids),
                             list(s.logprobs), s.finish_reason, s.max_new_tokens,
                             list(self.versions[s.sample_id])) for s in self.carried.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.carried, self.versions = {}, {}
        for sid, prompt, resp, logp, reason, max_new, versions in state["carried"]:
            self.carried[sid] = Sample(sid, prompt, resp, logp, reason, max_new)
            self.versions[sid] = list(versions)


def behaviour_logp(old_logp: torch.Tensor, gen_logp: torch.Tensor, stale: torch.Tensor
                   ) -> torch.Tensor:
    """The behaviour policy's per-token log-probs: those recorded at sampling time for
    tokens sampled by older weights, the current policy's recomputed ones elsewhere (the
    same weights sampled them, so the importance weight is exactly 1 there)."""
    return torch.where(stale.to(old_logp.device), gen_logp.to(old_logp.device), old_logp)
