"""Native generation engine: log-probs, per-sample streams, continuous batching."""

import pytest
import torch

from fusedrl.generation import GenerationEngine, Request, SamplingParams, forced_lengths
from fusedrl.generation.sampling import filter_probs, stream_uniform
from fusedrl.models import ModelConfig
from fusedrl.models.build import build_model
from gen_helpers import fresh_logprobs, random_requests

CFG = ModelConfig(vocab_size=50, hidden_size=48, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=96)
EOS = 2


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, "lm", seed=1).eval()


def requests(n, seed=0):
    return random_requests(n, CFG.vocab_size, seed)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=20, seed=3),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=20, seed=4),
    SamplingParams(temperature=0.0, max_new_tokens=12),
])
def test_logprobs_equal_fresh_forward(model, params):
    engine = GenerationEngine(model, max_batch_size=4, max_seq_len=48, eos_token_ids=[EOS])
    samples = engine.generate(requests(10), params)
    temp = params.temperature or 1.0
    for s in samples:
        assert 1 <= len(s.response_ids) <= params.max_new_tokens
        ref = fresh_logprobs(model, s, temp)
        assert (torch.tensor(s.logprobs) - ref).abs().max().item() <= 1e-4


def test_samples_do_not_depend_on_batch(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11)
    reqs = requests(9, seed=5)
    a = GenerationEngine(model, max_batch_size=9, max_seq_len=48).generate(reqs, params)
    b = GenerationEngine(model, max_batch_size=2, max_seq_len=48).generate(
        [Request(r.sample_id, r.prompt_ids) for r in reversed(reqs)], params)
    by_id = {s.sample_id: s.response_ids for s in b}
    for s in a:
        assert s.response_ids == by_id[s.sample_id]
    # a different seed changes the samples
    c = GenerationEngine(model, max_batch_size=9, max_seq_len=48).generate(
        [Request(r.sample_id, r.prompt_ids) for r in reqs],
        SamplingParams(temperature=1.0, max_new_tokens=16, seed=12))
    assert any(x.response_ids != y.response_ids for x, y in zip(a, c))


def test_continuous_batching_refills_slots(model):
    engine = GenerationEngine(model, max_batch_size=2, max_seq_len=48)
    lengths = [1, 6, 2, 3]
    reqs = [Request(i, [5, 6, 7], max_new_tokens=n) for i, n in enumerate(lengths)]
    engine.start(SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add(reqs)
    order, steps = [], 0
    while engine.has_unfinished():
        assert engine.num_running() <= 2
        order += [s.sample_id for s in engine.step()]
        steps += 1
    assert order == [0, 2, 3, 1]
    assert steps == 6  # the longest sample bounds the steps: slots were refilled at once


def test_eos_stops_sample(model):
    # Make EOS overwhelmingly likely after any token.
    m = build_model(CFG, "lm", seed=1).eval()
    with torch.no_grad():
        m.lm_head.weight[EOS] = m.model.norm.weight * 0 + 5.0
        m.model.norm.weight.fill_(1.0)
    engine = GenerationEngine(m, max_batch_size=4, max_seq_len=48, eos_token_ids=[EOS])
    out = engine.generate(requests(4), SamplingParams(temperature=0.0, max_new_tokens=10))
    ignored = GenerationEngine(m, max_batch_size=4, max_seq_len=48, eos_token_ids=[EOS]).generate(
        requests(4), SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert any(s.finish_reason == "eos" and s.response_ids[-1] == EOS for s in out)
    assert all(len(s.response_ids) == 10 and s.finish_reason == "length" for s in ignored)


def test_forced_lengths_benchmark_mode(model):
    lengths = forced_lengths("lognormal:6,30", 12, seed=0, max_len=40)
    reqs = [Request(i, [4, 5], max_new_tokens=n) for i, n in enumerate(lengths)]
    out = GenerationEngine(model, max_batch_size=5, max_seq_len=48).generate(
        reqs, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert [len(s.response_ids) for s in out] == lengths


def test_abort_and_resume_continue_the_same_stream(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7, ignore_eos=True)
    reqs = requests(3, seed=9)
    full = GenerationEngine(model, max_batch_size=3, max_seq_len=48).generate(reqs, params)
    eng = GenerationEngine(model, max_batch_size=3, max_seq_len=48)
    eng.start(params)
    eng.add([Request(r.sample_id, r.prompt_ids) for r in reqs])
    for _ in range(6):
        eng.step()
    partial = eng.abort(1)
    assert partial.finish_reason == "aborted" and len(partial.response_ids) == 6
    other = GenerationEngine(model, max_batch_size=2, max_seq_len=48)
    resumed = other.generate([Request.resume(partial)], params)[0]
    assert resumed.response_ids == full[1].response_ids
    assert torch.allclose(torch.tensor(resumed.logprobs), torch.tensor(full[1].logprobs),
                          atol=1e-5)


def test_filters_and_streams():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert (filter_probs(probs, 2, 1.0) > 0).tolist() == [[True, True, False, False]]
    assert (filter_probs(probs, 0, 0.8) > 0).tolist() == [[True, True, False, False]]
    assert (filter_probs(probs, 0, 0.81) > 0).tolist() == [[True, True, True, False]]
    assert filter_probs(probs, 0, 0.81)[0, 2].item() == probs[0, 2].item()
    u = stream_uniform(0, [1, 1, 2], [0, 1, 0])
    assert len(set(u.tolist())) == 3 and ((u >= 0) & (u < 1)).all()
    assert stream_uniform(0, [1], [1])[0] == u[1]


def test_bad_requests(model):
    engine = GenerationEngine(model, max_batch_size=2, max_seq_len=10)
    engine.start(SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.add(Request(0, [1, 2, 3]))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add(Request(1, []))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="lognormal"):
        forced_lengths("lognormal:5", 3)


def test_sample_tokens_match_reference_draw():
    # The inverse-CDF draw by binary search and the greedy max must pick the tokens the
    # plain formulas pick (full comparison count, argmax), ties included.
    from fusedrl.generation.sampling import sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 300, generator=g) * 3
    logits[0, [5, 9]] = 50.0  # a tie: the first index wins
    ids, steps = list(range(8)), [3] * 8
    for params in (SamplingParams(temperature=1.0, seed=2),
                   SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=2)):
        tokens, logps = sample_tokens(logits, params, ids, steps)
        logp = torch.log_softmax(logits / params.temperature, dim=-1)
        probs = filter_probs(logp.exp(), params.top_k, params.top_p)
        cdf = torch.cumsum(probs.double(), dim=-1)
        u = torch.from_numpy(stream_uniform(params.seed, ids, steps))
        ref = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)
        assert tokens.tolist() == ref.tolist()
        assert torch.equal(logps, logp.gather(-1, tokens[:, None]).squeeze(-1))
    tokens, _ = sample_tokens(logits, SamplingParams(temperature=0.0), ids, steps)
    assert tokens.tolist() == logits.argmax(-1).tolist() and tokens[0].item() == 5


@pytest.mark.parametrize("batch", [1, 3, 4, 8])  # pack_rows=4: packed for 2-4 rows
def test_fast_forward_matches_model_and_follows_weight_updates(batch):
    from fusedrl.generation import fastpath

    m = build_model(CFG, "lm", seed=2).eval()
    fast = fastpath.FastForward(m, pack_rows=4)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, CFG.vocab_size, (batch, 5), generator=g)
    positions = torch.arange(5).expand(batch, 5)
    select = torch.full((batch,), 4)

    def both():
        slots = torch.arange(batch)
        got = fast(ids, positions, m.new_cache(batch, 16).bind(slots), select)
        with torch.no_grad():
            ref = m(ids, positions, m.new_cache(batch, 16).bind(slots), select=select)
        return got, ref

    got, ref = both()
    assert (got - ref).abs().max().item() <= 1e-5
    with torch.no_grad():  # in place, as training and weight sync do
        m.lm_head.weight.mul_(2.0)
        next(iter(m.model.layers.values())).mlp.down_proj.weight.add_(0.01)
    got2, ref2 = both()
    assert (got2 - ref2).abs().max().item() <= 1e-5
    assert (got2 - got).abs().max().item() > 1e-3


def test_fast_forward_groups_equal_separate_forwards():
    # Prefill of admitted samples and decode of running ones in one forward (the engine's
    # mixed step) gives each group the logits of its own forward.
    from fusedrl.generation import fastpath

    m = build_model(CFG, "lm", seed=3).eval()
    fast = fastpath.FastForward(m, pack_rows=4)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, CFG.vocab_size, (2, 6), generator=g)
    pre = (prompt, torch.arange(6).expand(2, 6), torch.tensor([0, 2]), torch.tensor([5, 3]))

    def decoded(cache):
        # slots 1 and 3 hold 4 tokens; decode one more at position 4
        ctx = torch.randint(3, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))
        fast(ctx, torch.arange(4).expand(2, 4), cache.bind(torch.tensor([1, 3])),
             torch.tensor([3, 3]))
        return (torch.tensor([[7], [9]]), torch.tensor([[4], [4]]), torch.tensor([1, 3]),
                torch.tensor([0, 0]))

    cache = m.new_cache(4, 16)
    dec = decoded(cache)
    both = fast.forward_groups([pre, dec], cache)
    cache = m.new_cache(4, 16)
    dec = decoded(cache)
    alone = torch.cat([fast(*pre[:2], cache.bind(pre[2]), pre[3]),
                       fast(*dec[:2], cache.bind(dec[2]), dec[3])])
    assert both.shape == (4, CFG.vocab_size)
    assert (both - alone).abs().max().item() <= 1e-5


def test_packed_weight_budget_from_config():
    # generation.packed_weights_gib bounds the MKL-packed copies; 0 packs nothing and
    # the engine still generates the same tokens.
    from fusedrl.config import ConfigError, load_config
    from fusedrl.generation import fastpath
    from fusedrl.generation.backend import backend_from_config

    with pytest.raises(ConfigError, match="generation.packed_weights_gib=-1"):
        load_config(None, ["generation.packed_weights_gib=-1"])
    m = build_model(CFG, "lm", seed=4).eval()
    reqs = [Request(i, [3 + i, 4, 5], max_new_tokens=6) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    out = {}
    for gib in (0, 1):
        cfg = load_config(None, [f"generation.packed_weights_gib={gib}",
                                 "generation.max_batch_size=4", "data.max_prompt_len=16",
                                 "generation.max_new_tokens=8"])
        backend = backend_from_config(cfg, m, eos_token_ids=(), pad_token_id=0)
        out[gib] = [s.response_ids for s in backend.generate(reqs, params)]
        fast = backend.engine._forward
        assert isinstance(fast, fastpath.FastForward)
        packed = [w[1] is not None for w in [fast._head] + [l[2] for l in fast._layers]]
        assert not any(packed) if gib == 0 else (all(packed) or not fastpath._mkl_packing())
    assert out[0] == out[1]
