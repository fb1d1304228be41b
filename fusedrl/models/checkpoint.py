"""Checkpoints: Hugging Face safetensors directories and GGUF files in, safetensors out.

Everything here works on *full* (unsharded) Hugging Face state dicts; slicing a full
state dict into a rank's shard is ``fusedrl.models.sharding``'s job. Writes are
atomic: a checkpoint directory is written under a temporary name and renamed into
place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fusedrl.models.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the path."""


# ---------------------------------------------------------------------------- config


def config_from_hf(hf: dict, path: Path | str = "config.json") -> ModelConfig:
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get(
                "rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=int(hf.get("head_dim") or 0),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} in the model config") from None


VALUE_ARCHITECTURE = "LlamaForSequenceClassification"
"""What a value head (critic, reward model) is saved as. Its head is exactly fusedrl's
``score`` (``nn.Linear(hidden, 1, bias=False)``), so transformers loads every weight and
initialises none; its logits are the value at each row's last non-pad token (how a
reward model scores a sample; the format TRL/OpenRLHF reward models use, so those load
here too). Per-token values (the critic's): ``m.score(m.model(ids).last_hidden_state)``,
or ``AutoModelForTokenClassification`` with the ``token_classification_bias: false``
written below (transformers versions that know that key)."""


def config_to_hf(config: ModelConfig, head: str = "lm", dtype: str = "float32") -> dict:
    arch = {"architectures": ["LlamaForCausalLM"]}
    if head != "lm":
        arch = {"architectures": [VALUE_ARCHITECTURE], "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0}, "problem_type": "regression",
                "token_classification_bias": False}
    return {
        **arch,
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # fusedrl unties embeddings on load, so its checkpoints always carry lm_head.
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


# ------------------------------------------------------------------------ safetensors


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file in the checkpoint directory")
    return files


def load_safetensors_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a Hugging Face Llama checkpoint directory (config.json + safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: missing model config")
    try:
        config = config_from_hf(json.loads(cfg_path.read_text()), cfg_path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    state: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(path):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    return config, _untie(config, state)


def _untie(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied embeddings are untied on load (docs/design.md): lm_head becomes its own copy.
    if "lm_head.weight" not in state and "score.weight" not in state:
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return state


# ----------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter permutes q/k rows from HF's rotate-half layout to interleaved
    # pairs (convert_hf_to_gguf.py: LlamaModel.permute); this is its inverse.
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    p = f"{arch}."
    heads = int(_gguf_field(reader, p + "attention.head_count"))
    vocab = _gguf_field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(_gguf_field(reader, p + "embedding_length")),
        intermediate_size=int(_gguf_field(reader, p + "feed_forward_length")),
        num_layers=int(_gguf_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_gguf_field(reader, p + "attention.head_count_kv", heads)),
        max_position_embeddings=int(_gguf_field(reader, p + "context_length", 2048)),
        rope_theta=float(_gguf_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_gguf_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=not has_output,
    )


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a llama-architecture GGUF file, dequantized to float32 HF tensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable GGUF file ({e})") from None
    config = gguf_config(reader, path)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF stores dims fastest-first; dequantize returns them in numpy (HF) order.
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, kind, _ = name.split(".", 3)
            if kind not in _GGUF_LAYER_NAMES:
                continue  # e.g. rope_freqs: recomputed from rope_theta
            hf = f"model.layers.{idx}.{_GGUF_LAYER_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = _unpermute_rope(w, config.num_heads)
            elif kind == "attn_k":
                w = _unpermute_rope(w, config.num_kv_heads)
        else:
            continue
        state[hf] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    return config, _untie(config, state)


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a full state dict from a safetensors directory or a ``.gguf`` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    return load_safetensors_dir(path)


# ---------------------------------------------------------------------------- saving


def atomic_dir(final: Path):
    """Context manager yielding a temporary directory renamed to ``final`` on success."""
    return _AtomicDir(Path(final))


DIR_MODE, FILE_MODE = 0o755, 0o644
"""Checkpoints are for the group (a cluster's users share the run directory): set
explicitly, whatever the umask and ``mkdtemp``'s private 0700."""


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-",
                                         dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, DIR_MODE)
        for f in self.tmp.rglob("*"):
            if f.is_dir():
                os.chmod(f, DIR_MODE)
            elif f.is_file():
                os.chmod(f, FILE_MODE)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if self.final.exists():
            # Replace an older copy: move it aside first so there is never a moment
            # with neither the old nor the new directory in place.
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def save_hf_checkpoint(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                       head: str = "lm", tokenizer=None) -> None:
    """Write ``state`` (full tensors) as a Hugging Face checkpoint into ``directory``.

    ``directory`` must be the inside of an :func:`atomic_dir` or a fresh directory.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors \
        else "float32"
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, head, dtype),
                                                      indent=2))
    if tokenizer is not None:
        write_inference_files(directory, head, tokenizer)


def special_token_ids(tokenizer) -> dict:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of a fusedrl tokenizer, as
    Hugging Face configs name them. ``eos_token_id`` lists every id the engine stops at
    (a chat model's end-of-turn as well as its eos), so ``generate()`` stops there too."""
    from fusedrl.models.tokenizer import CharTokenizer, HFTokenizer

    # a transformers tokenizer itself (transformers 5 answers eos_token_ids with an int)
    if not isinstance(tokenizer, (CharTokenizer, HFTokenizer)):
        tokenizer = HFTokenizer(tokenizer)
    eos = sorted(int(t) for t in tokenizer.eos_token_ids)
    ids = {"eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": int(tokenizer.pad_token_id)}
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    return ids


def write_inference_files(directory: Path, head: str, tokenizer, generation=None) -> None:
    """Make a saved model directory ready for ``transformers`` as it is: the special
    token ids in ``config.json``, the tokenizer (eos, pad, chat template), and for an LM
    head a ``generation_config.json`` with the engine's stop tokens, so that
    ``AutoModelForCausalLM.from_pretrained(d).generate(...)`` stops where fusedrl's engine
    stops. ``generation`` (a :class:`~fusedrl.config.GenerationSection`) adds the
    rollout sampling (temperature, top-p/k, ``max_new_tokens``) as the defaults."""
    directory = Path(directory)
    ids = special_token_ids(tokenizer)
    cfg_path = directory / "config.json"
    hf = json.loads(cfg_path.read_text())
    hf.update(ids)
    cfg_path.write_text(json.dumps(hf, indent=2))
    if hasattr(tokenizer, "save_pretrained") and not (directory / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(str(directory))
    if head == "lm":
        gen = dict(ids)
        if generation is not None:
            gen.update(do_sample=True, temperature=generation.temperature,
                       top_p=generation.top_p, top_k=generation.top_k,
                       max_new_tokens=generation.max_new_tokens)
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))


def make_inference_ready(checkpoint: Path, tokenizer, generation=None) -> None:
    """:func:`write_inference_files` for a training checkpoint's ``actor/`` (LM head)
    and ``critic/`` (value head)."""
    checkpoint = Path(checkpoint)
    for name, head in (("actor", "lm"), ("critic", "value")):
        if (checkpoint / name / "config.json").exists():
            write_inference_files(checkpoint / name, head, tokenizer, generation)
