"""Partial rollouts (issue 18 item 2): the policy's decisions, the carry-over state,
the batch close on a real engine, the decoupled loss against a hand-computed value,
and ``fusedrl train`` with ``fusion.interstage_policy: partial``."""

import math

import pytest
import torch

from fusedrl.algorithms import policy_loss
from fusedrl.generation.engine import Request, Sample
from fusedrl.partial import (BatchClose, GroupTracker, PartialRollouts, behaviour_logp,
                             unstarted)
from fusedrl.scheduler.gen_cost import GenCostModel
from fusedrl.scheduler.interstage import get_policy
from fusedrl.scheduler.partial import CarriedSample, PartialRolloutPolicy, is_partial


def policy(**kw):
    return get_policy("partial", cost=GenCostModel(), num_instances=2, max_batch=8, **kw)


# ---------------------------------------------------------------- the policy


def test_registered_and_never_migrates():
    p = policy()
    assert isinstance(p, PartialRolloutPolicy) and is_partial("partial")
    assert not is_partial("rlhfuse") and not is_partial("nope")
    assert p.threshold(32) == 0 and p.plan({}, threshold=0, max_sample_tokens=9) is None


def test_launch_counts_carried_groups():
    p = policy(oversample=0.5)
    assert p.launch(8, 0) == 12  # 1.5x the batch in flight
    assert p.launch(8, 5) == 7
    assert p.launch(8, 20) == 0
    assert policy(oversample=0.0).launch(8, 0) == 8
    assert policy(oversample=0.3).launch(10, 0) == 13
    with pytest.raises(ValueError, match="oversample"):
        policy(oversample=-1)


def test_staleness_bound():
    p = policy(max_staleness=1)
    assert not p.too_stale(None, 9)  # no token yet
    assert not p.too_stale(3, 3) and not p.too_stale(3, 4)
    assert p.too_stale(3, 5)
    assert policy(max_staleness=0).too_stale(3, 4)
    assert not policy(max_staleness=2).too_stale(3, 5)


def test_carry_order_oldest_first_then_data_order():
    p = policy()
    got = p.carry_order([CarriedSample(7, 5, 2), CarriedSample(3, 0, None),
                         CarriedSample(9, 4, 1), CarriedSample(4, 2, 2)])
    assert [c.sample_id for c in got] == [9, 4, 7, 3]


# ---------------------------------------------------------------- batch close


def _sample(sid, n, reason="eos"):
    return Sample(sid, [1, 2], list(range(3, 3 + n)), [-0.5] * n, reason, None)


def test_group_tracker_closes_at_target_groups():
    close = BatchClose(group_size=2, target=2, finished=[_sample(5, 2)])
    t = GroupTracker(close)
    assert t.start() == []  # group 2 waits for sample 4
    assert t.add(_sample(0, 1)) == [] and not t.closed
    assert [s.sample_id for s in t.add(_sample(4, 3))] == [5, 4]  # group 2 complete
    assert [s.sample_id for s in t.add(_sample(1, 1))] == [0, 1]
    assert t.closed and t.groups_done == 2
    t.add(_sample(6, 1))  # after the close: carried, finished
    t.add(_sample(3, 1))
    assert sorted(s.sample_id for s in t.leftover()) == [3, 6]
    with pytest.raises(ValueError, match="aborted"):
        GroupTracker(close).add(_sample(8, 1, "aborted"))


class _Engine:
    """A step-level backend whose sample ``i`` needs ``lengths[i]`` steps."""

    def __init__(self, lengths, max_batch):
        self.lengths, self.max_batch = lengths, max_batch
        self.queue, self.running = [], []

    def start(self, params):
        assert not self.queue and not self.running

    def add(self, requests):
        self.queue += [Request(r.sample_id, r.prompt_ids, r.max_new_tokens,
                               list(r.response_ids), list(r.logprobs)) for r in requests]

    def has_unfinished(self):
        return bool(self.queue or self.running)

    def step(self):
        while self.queue and len(self.running) < self.max_batch:
            self.running.append(self.queue.pop(0))
        done = []
        for r in list(self.running):
            r.response_ids.append(7)
            r.logprobs.append(-1.0)
            if len(r.response_ids) >= r.max_new_tokens:
                self.running.remove(r)
                done.append(Sample(r.sample_id, r.prompt_ids, r.response_ids, r.logprobs,
                                   "eos", r.max_new_tokens))
        return done

    def progress(self):
        from fusedrl.generation.backend import SampleProgress

        return [SampleProgress(r.sample_id, 1, len(r.response_ids), k < len(self.running))
                for k, r in enumerate(self.running + self.queue)]

    def abort(self, sid):
        for pool in (self.running, self.queue):
            for r in pool:
                if r.sample_id == sid:
                    pool.remove(r)
                    return Sample(sid, r.prompt_ids, r.response_ids, r.logprobs, "aborted",
                                  r.max_new_tokens)
        raise KeyError(sid)


class _Out:
    def __init__(self, samples, carried):
        from fusedrl.rollout import RolloutBatch

        self.batch = RolloutBatch.from_samples(samples, 0)
        self.carried = carried


def _config(**fusion):
    from fusedrl.config import load_config

    fusion.setdefault("oversample", 0.5)

    return load_config(None, ["fusion.interstage_policy=partial", "ppo.rollout_batch_size=4",
                              "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                              "actor.rollout_n=1"] +
                       [f"fusion.{k}={v}" for k, v in fusion.items()])


def _requests(lengths):
    def make(first, count):
        return [Request(k, [1], max_new_tokens=lengths.get(k, 2)) for k in range(first, first + count)]
    return make


def _iterations(mgr, lengths, versions, max_batch=8):
    from fusedrl.partial import generate_until_closed

    seen = []
    for version in versions:
        requests, close = mgr.begin(version, _requests(lengths))
        carried = [r for r in requests if r.response_ids]
        assert requests[:len(carried)] == carried  # carried samples resume first
        batch, carried = generate_until_closed(_Engine(lengths, max_batch), requests, None,
                                               close)
        assert len(batch) == mgr.target  # the target count closes the batch
        stale, metrics = mgr.end(_Out(batch, carried), version)
        seen.append(([s.sample_id for s in batch], metrics, stale, requests))
    return seen


def test_carry_over_across_iterations():
    # samples 1 and 3 are long; 4 samples close a batch; 6 in flight (oversample 0.5)
    lengths = {0: 2, 1: 30, 2: 3, 3: 12, 4: 2, 5: 4}  # the rest: 2 tokens
    mgr = PartialRollouts(_config(max_staleness=1))
    seen = _iterations(mgr, lengths, range(3))
    assert [r.sample_id for r in seen[0][3]] == [0, 1, 2, 3, 4, 5]
    # iteration 0: 0, 4, 2, 5 finish first (2, 2, 3, 4 steps); 1 and 3 carried, 4 tokens each
    assert seen[0][0] == [0, 2, 4, 5]
    m = seen[0][1]
    assert (m["partial/carried"], m["partial/carried_tokens"], m["partial/launched"]) == (2, 8, 6)
    # iteration 1: 1 and 3 resume first (data order among equals) with their 4 tokens of
    # version 0; at the staleness bound they cannot be carried again, so the batch waits
    # for them; two of the four new samples fill it, the other two are carried finished
    assert [r.sample_id for r in seen[1][3]] == [1, 3, 6, 7, 8, 9]
    assert seen[1][0] == [1, 3, 6, 7]
    for row in (0, 1):
        assert seen[1][2][row, :4].all() and not seen[1][2][row, 4:].any()
    assert not seen[1][2][2:].any()
    m = seen[1][1]
    assert m["partial/staleness/max"] == 1 and m["partial/staleness/mean"] == 0.5
    assert m["partial/stale_token_frac"] == pytest.approx(8 / (30 + 12 + 2 + 2))
    assert m["partial/launched"] == 4 and m["partial/carried"] == 2
    # iteration 2: 8 and 9 (finished by version 1) are in the batch without generating
    assert seen[2][0][:2] == [8, 9]
    assert all(v[1]["partial/tokens_wasted"] == 0 for v in seen)


def test_staleness_bound_restarts_and_counts_wasted_tokens():
    lengths = {0: 2, 1: 30, 2: 3, 3: 12, 4: 2, 5: 4}
    mgr = PartialRollouts(_config(max_staleness=0))
    seen = _iterations(mgr, lengths, range(2))
    # max_staleness 0: the 8 tokens of 1 and 3 cannot be trained from version 1
    assert seen[1][1]["partial/tokens_wasted"] == 8
    assert all(not r.response_ids for r in seen[1][3])
    assert all(v[1]["partial/staleness/max"] == 0 and not v[2].any() for v in seen)


def test_state_dict_round_trip():
    lengths = {k: (40 if k % 3 == 0 else 2) for k in range(40)}
    mgr = PartialRollouts(_config())
    from fusedrl.partial import generate_until_closed

    requests, close = mgr.begin(0, _requests(lengths))
    batch, carried = generate_until_closed(_Engine(lengths, 8), requests, None, close)
    mgr.end(_Out(batch, carried), 0)
    other = PartialRollouts(_config())
    other.load_state_dict(mgr.state_dict())
    a, b = mgr.begin(1, _requests(lengths)), other.begin(1, _requests(lengths))
    assert [(r.sample_id, r.response_ids, r.logprobs) for r in a[0]] == \
        [(r.sample_id, r.response_ids, r.logprobs) for r in b[0]]
    assert other.cursor == mgr.cursor and other.versions == mgr.versions


def test_unstarted_is_aborted_sample():
    s = unstarted(Request(3, [1, 2], 5))
    assert s.finish_reason == "aborted" and s.response_ids == [] and s.max_new_tokens == 5


# ---------------------------------------------------------------- the loss


def test_decoupled_loss_hand_computed():
    # token 0: sampled by older weights (pi_behav 0.2), proximal 0.4, current 0.5
    # token 1: sampled by the current weights (behav == old): weight 1
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.3)]])
    behav = torch.tensor([[math.log(0.2), math.log(0.3)]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # token 0: ratio 1.25 clipped to 1.2, A=1 -> -1.2, weight 0.4/0.2 = 2 -> -2.4
    # token 1: ratio 1, A=-1 -> 1, weight 1 -> 1;  token-mean: (-2.4 + 1) / 2 = -0.7
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, behav_logprob=behav)
    assert float(loss.detach()) == pytest.approx(-0.7, abs=1e-6)
    assert stats["behav_weight_mean"] == pytest.approx(1.5, abs=1e-6)
    loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlogp of -A*ratio*w / 2 = 1 * 1 / 2
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.5], abs=1e-6)
    # the cap drops token 0 (weight 2 > 1.5): the loss is token 1's alone
    capped, st = policy_loss(logp.detach(), old, adv, mask, 0.2, behav_logprob=behav,
                             behav_weight_cap=1.5)
    assert float(capped) == pytest.approx(1.0, abs=1e-6)
    assert st["behav_capped_frac"] == pytest.approx(0.5)
    # behaviour == proximal everywhere: PPO's loss exactly
    plain, _ = policy_loss(logp.detach(), old, adv, mask, 0.2)
    same, _ = policy_loss(logp.detach(), old, adv, mask, 0.2, behav_logprob=old)
    assert float(same) == float(plain)


def test_behaviour_logp_only_for_stale_tokens():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    gen = torch.tensor([[-1.5, -2.5, -3.5]])
    stale = torch.tensor([[True, False, False]])
    assert behaviour_logp(old, gen, stale).tolist() == [[-1.5, -2.0, -3.0]]


# ---------------------------------------------------------------- fusedrl train

TRAIN = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=4",
         "ppo.ppo_epochs=1", "generation.max_new_tokens=16", "data.num_prompts=64",
         "generation.forced_lengths=lognormal:3,16", "fusion.interstage_policy=partial",
         "fusion.oversample=0.5",
         "model.frozen_dtype=float32"]
PARTIAL_KEYS = ("partial/launched", "partial/carried", "partial/carried_tokens",
                "partial/staleness/mean", "partial/stale_token_frac", "partial/tokens_wasted")


def _read(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_one_device_resume_repeats_the_uninterrupted_run(tmp_path):
    """Carried samples are saved with the checkpoint (trainer_state.pt) and resumed from
    it: the resumed run repeats the uninterrupted one, carried samples included."""
    from fusedrl.checkpointing import read_trainer_state
    from fusedrl.cli.train import train
    from fusedrl.config import load_config

    full = load_config(None, TRAIN + ["trainer.iterations=4", "trainer.save_every=2"])
    train(full, tmp_path / "a", show_progress=False)
    a = _read(tmp_path / "a")
    state = read_trainer_state(tmp_path / "a/checkpoints/iter_2")
    assert state["partial"]["carried"], "no sample in flight at the checkpoint"
    assert any(m["partial/stale_token_frac"] > 0 for m in a)  # carried tokens trained on
    assert all(m["partial/staleness/max"] <= 1 for m in a)
    assert any("actor/behav_weight_mean" in m for m in a)

    part = load_config(None, TRAIN + ["trainer.iterations=2", "trainer.save_every=2"])
    train(part, tmp_path / "b", show_progress=False)
    train(full, tmp_path / "b", resume=True, show_progress=False)
    b = _read(tmp_path / "b")
    assert [m["iteration"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a[2:], b[2:]):
        for key in PARTIAL_KEYS + ("critic/score/mean", "actor/pg_loss", "actor/ppo_kl",
                                   "response_length/mean"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_train_one_device_grpo_groups_complete():
    """GRPO groups (actor.rollout_n=2): the batch holds whole groups, consecutive rows."""
    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer

    cfg = load_config(None, TRAIN + ["algorithm.adv_estimator=grpo", "actor.rollout_n=2",
                                     "ppo.rollout_batch_size=4", "trainer.iterations=3"])
    t = make_trainer(cfg)
    batches = []
    run = t.stages.rollout.run

    def capture(requests, params, close=None):
        out = run(requests, params, close=close)
        batches.append(out)
        return out

    t.stages.rollout.run = capture
    try:
        metrics = [t.step() for _ in range(3)]
    finally:
        t.close()
    for out in batches:
        ids = out.batch.sample_ids.tolist()
        assert len(ids) == 8 and ids == sorted(ids)
        assert [i // 2 for i in ids[::2]] == [i // 2 for i in ids[1::2]]  # pairs = groups
        assert all(s.sample_id not in ids for s in out.carried)
    assert sum(m["partial/carried"] for m in metrics) > 0


@pytest.mark.ray
@pytest.mark.slow
def test_train_two_ray_devices_interstage(tmp_path, ray_session):
    """The inter-stage fused rollout closes the batch at its target on 2 Ray devices."""
    from fusedrl.cli.train import train
    from fusedrl.config import load_config

    cfg = load_config(None, TRAIN + ["trainer.iterations=3", "cluster.devices=2",
                                     "placement.default=dp2tp1pp1@0-1",
                                     "fusion.interstage=true"])
    train(cfg, tmp_path / "r", show_progress=False)
    m = _read(tmp_path / "r")
    assert [x["iteration"] for x in m] == [1, 2, 3]
    assert all(x["interstage/rt"] == 0 for x in m)  # partial: no migration
    assert m[0]["partial/launched"] == 12 and m[0]["partial/carried"] > 0
    assert any(x["partial/stale_token_frac"] > 0 for x in m[1:])
    assert all(x["partial/staleness/max"] <= 1 for x in m)


@pytest.mark.ray
@pytest.mark.slow
def test_train_two_ray_devices_resume_carries_the_checkpointed_samples(tmp_path, ray_session):
    """On Ray the checkpoint holds the samples in flight too, and the resumed run trains
    on them. (Which groups complete first on two instances depends on the order their
    replies arrive, so a Ray run's batches are not bit-reproducible; on one device they
    are, and the resume there is compared metric by metric above.)"""
    from fusedrl.checkpointing import read_trainer_state
    from fusedrl.cli.train import train
    from fusedrl.config import load_config

    ray = TRAIN + ["cluster.devices=2", "placement.default=dp2tp1pp1@0-1",
                   "fusion.interstage=true", "trainer.save_every=2"]
    train(load_config(None, ray + ["trainer.iterations=2"]), tmp_path / "b",
          show_progress=False)
    carried = read_trainer_state(tmp_path / "b/checkpoints/iter_2")["partial"]["carried"]
    assert carried
    started = [c for c in carried if c[2]]  # carried with tokens of version 1
    train(load_config(None, ray + ["trainer.iterations=3"]), tmp_path / "b", resume=True,
          show_progress=False)
    m = _read(tmp_path / "b")[-1]
    assert m["iteration"] == 3
    # at the staleness bound, the carried samples with tokens are in the batch of 3
    assert m["partial/staleness/max"] == (1 if started else 0)
    assert (m["partial/stale_token_frac"] > 0) == bool(started)
