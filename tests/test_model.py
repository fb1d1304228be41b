"""The native Llama equals transformers' LlamaForCausalLM on the same weights."""

import json

import pytest
import torch

from fusedrl.models import ModelConfig
from fusedrl.models.build import build_model
from fusedrl.models.checkpoint import (CheckpointError, atomic_dir, load_checkpoint,
                                       save_hf_checkpoint)

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128, rope_theta=500.0)


def hf_model(cfg: ModelConfig, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=tie, attn_implementation="eager"))
    # Random norms so that a wrong norm would show.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return hf.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_path, tie):
    hf = hf_model(CFG, tie)
    hf.save_pretrained(tmp_path / "ckpt")
    config, state = load_checkpoint(tmp_path / "ckpt")
    assert config.num_kv_heads == 2 and config.rope_theta == 500.0
    model = build_model(config, "lm", state).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = build_model(CFG, "lm", seed=3).eval()
    with atomic_dir(tmp_path / "out") as d:
        save_hf_checkpoint(d, CFG, model.hf_state_dict())
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_value_head_from_lm_checkpoint(tmp_path):
    hf_model(CFG).save_pretrained(tmp_path / "ckpt")
    config, state = load_checkpoint(tmp_path / "ckpt")
    critic = build_model(config, "value", state)
    values = critic(torch.randint(0, CFG.vocab_size, (2, 5)))
    assert values.shape == (2, 5)
    assert torch.all(values == 0)  # zero-initialised score head
    assert "lm_head.weight" not in critic.hf_state_dict()


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(CheckpointError, match="missing key"):
        load_checkpoint(d)
    hf_model(CFG).save_pretrained(tmp_path / "trunc")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "trunc")


def test_smollm2_gguf_matches_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM

    config, state = load_checkpoint(smollm2_path)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    model = build_model(config, "lm", state).eval()
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    ids = torch.tensor([[1780, 314, 216, 35, 39, 27, 37, 40, 47]])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4


def test_smollm2_tokenizer_chat_template(smollm2_path):
    from fusedrl.models.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(smollm2_path)
    ids = tok.render_prompt("What is 2+2?", chat_template=True)
    text = tok.tok.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert "What is 2+2?" in text
    assert tok.tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids
    assert tok.decode(tok.encode("37+58")) == "37+58"
