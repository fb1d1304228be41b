"""Checkpoints are ready for inference with transformers as they are: the actor's
``generate()`` stops where fusedrl's engine stops, the value heads load without missing
or freshly initialised weights, and the files are readable by the group."""

import json
import os
import stat

import pytest
import torch

from fusedrl.config import load_config
from fusedrl.models import PRESETS, ModelConfig
from fusedrl.models.build import build_model
from fusedrl.models.checkpoint import (VALUE_ARCHITECTURE, atomic_dir, load_checkpoint,
                                       save_hf_checkpoint)
from fusedrl.models.tokenizer import CharTokenizer

CFG = ModelConfig(vocab_size=40, hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _value_model(seed=1):
    model = build_model(CFG, "value", seed=seed).eval()
    with torch.no_grad():  # a trained head, not the zero initialisation
        model.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def test_value_head_loads_exactly_as_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _value_model()
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789")
    with atomic_dir(tmp_path / "critic") as d:
        save_hf_checkpoint(d, CFG, model.hf_state_dict(), "value", tok)
    hf_cfg = json.loads((tmp_path / "critic" / "config.json").read_text())
    assert hf_cfg["architectures"] == [VALUE_ARCHITECTURE]
    assert hf_cfg["pad_token_id"] == tok.PAD
    hf, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "critic", output_loading_info=True, attn_implementation="eager")
    assert type(hf).__name__ == VALUE_ARCHITECTURE
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    # Per-token values (the critic) through the HF modules equal fusedrl's.
    ids = torch.randint(3, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf.score(hf.model(ids).last_hidden_state).squeeze(-1)
        assert (ours - theirs).abs().max().item() <= 1e-4
        # The pooled logit (a reward model's score) is the value at each row's last
        # non-pad token.
        padded = ids.clone()
        padded[1, 6:] = tok.PAD
        lengths = torch.tensor([9, 6])
        score = hf(padded).logits.squeeze(-1)
        expect = model(padded)[torch.arange(2), lengths - 1]
        assert (score - expect).abs().max().item() <= 1e-4
    # And the checkpoint still loads into fusedrl as a value head.
    config, state = load_checkpoint(tmp_path / "critic")
    again = build_model(config, "value", state).eval()
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_value_head_as_token_classification_has_no_fresh_bias(tmp_path):
    import transformers
    from transformers import AutoModelForTokenClassification

    with atomic_dir(tmp_path / "critic") as d:
        model = _value_model(2)
        save_hf_checkpoint(d, CFG, model.hf_state_dict(), "value")
    hf, info = AutoModelForTokenClassification.from_pretrained(
        tmp_path / "critic", output_loading_info=True, attn_implementation="eager")
    if hf.score.bias is not None:
        pytest.skip(f"transformers {transformers.__version__} ignores token_classification_bias")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(3, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf.eval()(ids).logits.squeeze(-1) - model(ids)).abs().max().item() <= 1e-4


def test_char_tokenizer_checkpoint_generates_with_transformers(tmp_path):
    """A from-scratch checkpoint (character tokenizer): AutoTokenizer loads its tokenizer,
    ids equal fusedrl's, and greedy ``generate()`` equals the native engine, stopping at
    the same eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedrl.generation import Request
    from fusedrl.generation.engine import GenerationEngine
    from fusedrl.generation.sampling import SamplingParams

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789")
    model = build_model(CFG, "lm", seed=5).eval()
    prompt = tok.render_prompt("hello")
    engine = GenerationEngine(model, max_batch_size=1, max_seq_len=64, eos_token_ids=(tok.EOS,),
                              pad_token_id=tok.PAD)
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    # Make eos the greedy choice after a few tokens: raise its logit where the model's
    # own greedy continuation reaches its 4th token.
    first = engine.generate([Request(0, prompt)], params)[0].response_ids
    with torch.no_grad():
        model.lm_head.weight[tok.EOS] = model.lm_head.weight[first[3]] * 1.5
    (sample,) = engine.generate([Request(0, prompt)], params)
    assert sample.finish_reason == "eos" and sample.response_ids[-1] == tok.EOS
    assert len(sample.response_ids) < params.max_new_tokens

    with atomic_dir(tmp_path / "actor") as d:
        save_hf_checkpoint(d, CFG, model.hf_state_dict(), "lm", tok)
    gen_cfg = json.loads((tmp_path / "actor" / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tok.EOS and gen_cfg["pad_token_id"] == tok.PAD
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "actor")
    assert hf_tok("hello").input_ids == prompt
    assert hf_tok.decode(sample.response_ids, skip_special_tokens=True) == \
        tok.decode(sample.response_ids)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "actor",
                                              attn_implementation="eager").eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)
    assert out[0, len(prompt):].tolist() == sample.response_ids


@pytest.mark.slow  # the 135M model on CPU: loading and two greedy generations
def test_smollm2_actor_checkpoint_stops_at_end_of_turn(smollm2_path, tmp_path):
    """SmolLM2 ends a chat answer with ``<|im_end|>``, not its tokenizer's eos: the saved
    actor's ``generate()`` stops there, on the same tokens as fusedrl's engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedrl.generation import Request
    from fusedrl.generation.engine import GenerationEngine
    from fusedrl.generation.sampling import SamplingParams
    from fusedrl.models.tokenizer import load_hf_tokenizer

    config, state = load_checkpoint(smollm2_path)
    tok = load_hf_tokenizer(smollm2_path)
    model = build_model(config, "lm", state).eval()
    with atomic_dir(tmp_path / "actor") as d:
        save_hf_checkpoint(d, config, model.hf_state_dict(), "lm", tok)
    prompt = tok.render_prompt("What is 37+58?", chat_template=True)
    engine = GenerationEngine(model, max_batch_size=1, max_seq_len=160,
                              eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    (sample,) = engine.generate([Request(0, prompt)],
                                SamplingParams(temperature=0.0, max_new_tokens=64))
    im_end = tok.tok.convert_tokens_to_ids("<|im_end|>")
    assert sample.finish_reason == "eos" and sample.response_ids[-1] == im_end

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "actor")
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is 37+58?"}],
                                      add_generation_prompt=True, tokenize=False)
    assert hf_tok(chat, add_special_tokens=False).input_ids == prompt
    assert hf_tok.pad_token_id is not None
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "actor",
                                              attn_implementation="eager").eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64)
    assert out[0, len(prompt):].tolist() == sample.response_ids


def test_checkpoint_files_are_group_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "ckpt") as d:
            save_hf_checkpoint(d / "critic", CFG, _value_model().hf_state_dict(), "value",
                               CharTokenizer("ab"))
            torch.save({"x": 1}, d / "trainer_state.pt")
    finally:
        os.umask(old)
    paths = [tmp_path / "ckpt", *(tmp_path / "ckpt").rglob("*")]
    assert len(paths) > 4
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))



def test_training_checkpoint_is_inference_ready(tmp_path):
    from fusedrl.cli.train import train

    cfg = load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                             "ppo.micro_batch_size=4", "generation.max_new_tokens=4",
                             "data.num_prompts=16", "trainer.iterations=1",
                             "generation.temperature=0.7"])
    train(cfg, tmp_path / "run", show_progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "iter_1"
    gen = json.loads((ckpt / "actor" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == CharTokenizer.EOS and gen["temperature"] == 0.7
    assert gen["max_new_tokens"] == 4
    critic = json.loads((ckpt / "critic" / "config.json").read_text())
    assert critic["architectures"] == [VALUE_ARCHITECTURE]
    assert critic["pad_token_id"] == CharTokenizer.PAD
    assert (ckpt / "actor" / "tokenizer.json").exists()
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
