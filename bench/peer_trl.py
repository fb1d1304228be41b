"""Peer comparison: PPO iterations of TRL's PPO trainer against fusedrl on CPU.

    python bench/peer_trl.py [--workload natural|fixed] [--preset small] [--batch B]
                             [--micro-batch M] [--response-length L] [--ppo-epochs E]
                             [--vocab V] [--fusedrl-variant all] [--iterations N]
                             [--rounds R] [--out bench/results/peer.json]

Two workloads:

- ``natural`` (default): sampled responses that end at EOS, each side with the whole
  machine. The model is a randomly initialised ``--preset`` Llama whose vocabulary is
  widened to ``--vocab`` ids (the task's characters plus unused ids): at initialisation
  its next-token distribution is close to uniform, so every step ends a response with
  probability about 1/V and the lengths are *geometric* (mean ~V, p99/median ~6.6, a
  long tail) up to the cap ``--response-length``. That is a stated stand-in for a
  trained model's answers, not a real one (a real 135M model trains at a few seconds per
  sample on one core: too slow for this comparison). TRL runs with its defaults (torch
  on every core, ``local_rollout_forward_batch_size`` 64, HF ``generate`` of the whole
  batch padded to its longest response, ``stop_token="eos"``); fusedrl runs its
  ``--fusedrl-variant`` configuration of ``bench/e2e.py`` on 2 devices (Ray workers,
  one core each): by default ``all`` (per-call layouts, inter- and intra-stage fusion).
  The realised lengths are reported per side (TRL: every response of every iteration;
  fusedrl: its engine's samples of the initial actor on the first prompts, the same
  distribution it starts from).
- ``fixed``: every response exactly ``--response-length`` tokens, one thread each side
  (below).

TRL dropped PPO in 1.x; the last PPO trainer is ``trl==0.29.1``
(``trl.experimental.ppo.PPOTrainer``). It lives in its own environment, ``.venv-trl``
(``make bench-peer-env``), never in fusedrl's dependencies: this script runs in
fusedrl's venv, builds the shared workload, runs fusedrl in-process and TRL as a
subprocess of ``.venv-trl/bin/python bench/peer_trl.py --trl-worker SPEC`` that prints
its timings as one JSON line. Without ``.venv-trl`` it writes ``{"skipped": reason}``
and exits 0.

Same work on both sides (``fixed``; ``natural`` differs where said above):

- model: a fusedrl preset Llama (random init, seed 0) saved as a Hugging Face
  checkpoint (``LlamaForCausalLM``) for actor and reference, and one value-model copy
  (``LlamaForSequenceClassification``, ``num_labels=1``, score head N(0, 0.02)) that is
  both critic initialisation and reward model on both sides;
- prompts: fusedrl's built-in ``repeat`` task, tokenized like its CharTokenizer
  (``<bos>`` + one token per character) by a word-level HF tokenizer built here and
  saved with the checkpoint; no hub access (``HF_HUB_OFFLINE=1``);
- lengths: every response exactly ``--response-length`` tokens (fusedrl
  ``generation.forced_lengths=fixed:L``; TRL ``response_length=L`` with no stop token);
- batch: ``--batch`` samples per iteration in one PPO mini-batch (TRL's trainer ties
  its rollout batch to ``per_device_train_batch_size * gradient_accumulation_steps``, and
  with several mini-batches its optimizer would step across mini-batch boundaries, so
  one mini-batch is the only setting where both take the same optimizer steps),
  micro-batches of ``--micro-batch`` for training, inference and generation
  (fusedrl ``generation.max_batch_size``, TRL ``local_rollout_forward_batch_size``),
  ``--ppo-epochs`` epochs, one optimizer step per epoch;
- one torch thread each, float32, temperature 1.

Measured: seconds per iteration (median over ``--iterations`` after one warm-up
iteration) and samples/s, per side; the rounds alternate which side runs first.
``ratio_fusedrl_over_trl`` is fusedrl's samples/s over TRL's (> 1: fusedrl faster).

Known differences of algorithm, not of workload: TRL takes the old log-probs from the
generation logits (no separate actor forward) and trains actor and critic as one
module with one optimizer; fusedrl recomputes old log-probs and keeps two optimizers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / ".venv-trl"
TRL_PYTHON = TRL_VENV / "bin" / "python"


# ----------------------------------------------------------------- shared workload


def build_workload(preset: str, directory: Path, seed: int = 0, vocab_size: int = 0) -> dict:
    """Actor and value checkpoints plus the tokenized prompts, written under ``directory``.
    ``vocab_size`` > the task's: the vocabulary is widened with unused ids (named
    ``<xN>`` in the tokenizer) that the untrained model samples like the others."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fusedrl.data.builtin import TASKS
    from fusedrl.models import PRESETS, ModelConfig
    from fusedrl.models.build import build_model
    from fusedrl.models.checkpoint import config_to_hf, save_hf_checkpoint
    from fusedrl.models.tokenizer import CharTokenizer, HFTokenizer

    task = TASKS["repeat"]
    chars = CharTokenizer(task.alphabet)
    vocab = {"<pad>": chars.PAD, "<bos>": chars.BOS, "<eos>": chars.EOS}
    vocab.update({c: chars.encode(c)[0] for c in chars.alphabet})
    if vocab_size and vocab_size < chars.vocab_size:
        raise ValueError(f"--vocab {vocab_size} is smaller than the task's {chars.vocab_size}")
    vocab.update({f"<x{i}>": i for i in range(chars.vocab_size, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", chars.BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", padding_side="left")

    config = ModelConfig(**{**PRESETS[preset].to_dict(),
                            "vocab_size": max(vocab_size, chars.vocab_size)})
    actor = build_model(config, "lm", seed=seed).hf_state_dict()
    value = build_model(config, "value", seed=seed + 1).hf_state_dict()
    gen = torch.Generator().manual_seed(seed + 2)
    value["score.weight"] = torch.randn(value["score.weight"].shape, generator=gen) * 0.02

    actor_dir, value_dir = directory / "actor", directory / "value"
    # fusedrl's wrapper: the special-token ids it writes come from its tokenizer interface
    # (a transformers 5 tokenizer answers ``eos_token_ids`` with one int).
    save_hf_checkpoint(actor_dir, config, actor, head="lm", tokenizer=HFTokenizer(tok))
    save_hf_checkpoint(value_dir, config, value, head="value", tokenizer=HFTokenizer(tok))
    hf = config_to_hf(config, "value")
    hf.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
              pad_token_id=chars.PAD, bos_token_id=chars.BOS, eos_token_id=chars.EOS)
    (value_dir / "config.json").write_text(json.dumps(hf, indent=2))

    prompts = [tok(r.prompt).input_ids for r in task.build(4096, seed)]
    ref = [chars.render_prompt(r.prompt) for r in task.build(len(prompts), seed)]
    assert prompts == ref, "HF tokenizer disagrees with fusedrl's CharTokenizer"
    return {"actor": str(actor_dir), "value": str(value_dir), "prompts": prompts,
            "params": config.num_params(), "vocab_size": config.vocab_size,
            "prompt_len": max(map(len, prompts)), "eos_token_id": chars.EOS}


def length_stats(lengths: list[int], cap: int) -> dict:
    """Median, p99, their ratio, mean, max and the share cut at ``cap`` of ``lengths``."""
    import numpy as np

    a = np.asarray(lengths, dtype=float)
    med, p99 = float(np.median(a)), float(np.percentile(a, 99))
    return {"count": int(a.size), "mean": float(a.mean()), "median": med, "p99": p99,
            "p99_over_median": p99 / med, "max": int(a.max()),
            "capped_fraction": float((a >= cap).mean())}


def natural_lengths(w: dict, a: argparse.Namespace, n: int) -> list[int]:
    """Response lengths (EOS included) that fusedrl's engine samples from the initial
    actor on the first ``n`` prompts with the benchmark's sampling settings."""
    import torch

    from fusedrl.generation import GenerationEngine, Request, SamplingParams
    from fusedrl.models.build import build_model
    from fusedrl.models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    config, state = load_checkpoint(Path(w["actor"]))
    actor = build_model(config, "lm", state).eval()
    engine = GenerationEngine(actor, max_batch_size=a.batch,
                              max_seq_len=w["prompt_len"] + a.response_length + 1,
                              eos_token_ids=(w["eos_token_id"],))
    params = SamplingParams(temperature=1.0, max_new_tokens=a.response_length, seed=0)
    with torch.no_grad():
        out = engine.generate([Request(i, list(p)) for i, p in enumerate(w["prompts"][:n])],
                              params)
    return [len(s.response_ids) for s in out]


# -------------------------------------------------------------------------- fusedrl


def fusedrl_overrides(w: dict, a: argparse.Namespace) -> list[str]:
    """fusedrl's config for the workload: ``fixed``: one device, forced lengths;
    ``natural``: the ``--fusedrl-variant`` of bench/e2e.py on 2 devices, responses ending
    at EOS."""
    common = [
        f"model.path={w['actor']}", f"model.critic_path={w['value']}",
        "reward.type=model", f"reward.model_path={w['value']}",
        "data.task=repeat", f"data.max_prompt_len={w['prompt_len']}",
        f"generation.max_new_tokens={a.response_length}", "generation.temperature=1.0",
        f"ppo.rollout_batch_size={a.batch}", f"ppo.mini_batch_size={a.batch}",
        f"ppo.micro_batch_size={a.micro_batch}", f"ppo.ppo_epochs={a.ppo_epochs}",
        "trainer.seed=0"]
    if a.workload == "fixed":
        return common + [f"generation.forced_lengths=fixed:{a.response_length}",
                         f"generation.max_batch_size={a.micro_batch}"]
    sys.path.insert(0, str(ROOT / "bench"))
    from e2e import COMMON, VARIANTS

    return common + COMMON + VARIANTS[a.fusedrl_variant] + [
        f"generation.max_batch_size={a.batch}"]


def run_fusedrl(w: dict, a: argparse.Namespace) -> list[float]:
    """Seconds of each of ``1 + a.iterations`` fusedrl iterations (first = warm-up)."""
    import torch

    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    trainer = make_trainer(load_config(None, fusedrl_overrides(w, a)))
    try:
        return [trainer.step()["timing_s/step"] for _ in range(1 + a.iterations)]
    finally:
        trainer.close()


# ------------------------------------------------------------------------------ TRL


def run_trl(w: dict, a: argparse.Namespace, workdir: Path) -> list[float]:
    """Seconds of each TRL iteration, from a ``.venv-trl`` subprocess."""
    spec = workdir / "trl_spec.json"
    natural = a.workload == "natural"
    spec.write_text(json.dumps({**w, "batch": a.batch, "micro_batch": a.micro_batch,
                                "response_length": a.response_length,
                                "ppo_epochs": a.ppo_epochs, "iterations": a.iterations,
                                "natural": natural, "output_dir": str(workdir / "trl-out")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if not natural:  # one thread, like fusedrl's single-device trainer
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(TRL_PYTHON), __file__, "--trl-worker", str(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    if not natural and sorted(set(line["response_lengths"])) != [a.response_length]:
        raise RuntimeError(f"TRL generated responses of lengths "
                           f"{sorted(set(line['response_lengths']))}, not exactly "
                           f"{a.response_length} tokens")
    TRL_LENGTHS.extend(line["response_lengths"])
    return line["iteration_s"]


TRL_LENGTHS: list[int] = []
"""Every response length TRL generated in this run (EOS included)."""


def trl_worker(spec_path: str) -> None:
    """Inside ``.venv-trl``: run TRL PPO for 1 + iterations updates, print timings."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = json.loads(Path(spec_path).read_text())
    natural = s["natural"]
    if not natural:  # natural: TRL's default, torch on every core
        torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(s["actor"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["actor"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(s["actor"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(s["value"], num_labels=1,
                                                               dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(s["value"], num_labels=1,
                                                                dtype=torch.float32)
    # Record every generated response's length (up to and with its first EOS): fixed
    # lengths are checked, natural ones reported.
    generated: list[int] = []
    generate = policy.generate
    eos = s["eos_token_id"]

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        resp = out.sequences[:, prompt.shape[1]:]
        for row in resp.tolist():
            generated.append(row.index(eos) + 1 if natural and eos in row else len(row))
        return out

    policy.generate = recording_generate
    b, m, n = s["batch"], s["micro_batch"], 1 + s["iterations"]
    # natural: TRL's own rollout batching (local_rollout_forward_batch_size) and EOS stop
    execution = ({"stop_token": "eos"} if natural else
                 {"stop_token": None, "local_rollout_forward_batch_size": m})
    args = PPOConfig(
        output_dir=s["output_dir"], report_to="none", use_cpu=True, seed=0,
        per_device_train_batch_size=m, gradient_accumulation_steps=b // m,
        num_mini_batches=1, num_ppo_epochs=s["ppo_epochs"],
        response_length=s["response_length"], temperature=1.0, total_episodes=b * n,
        num_sample_generations=0, save_strategy="no", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0, **execution)
    dataset = Dataset.from_dict({"input_ids": s["prompts"]})

    class Clock(TrainerCallback):
        """Wall time between the ends of consecutive PPO updates."""

        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *_, **__):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    clock = Clock()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=dataset,
                         callbacks=[clock])
    trainer.train()
    times = [t1 - t0 for t0, t1 in zip(clock.marks, clock.marks[1:])]
    import trl
    import transformers
    print(json.dumps({"iteration_s": times, "response_lengths": generated,
                      "threads": torch.get_num_threads(),
                      "trl": trl.__version__,
                      "transformers": transformers.__version__, "torch": torch.__version__}))


# ----------------------------------------------------------------------------- main


def summarize(times: list[list[float]], batch: int) -> dict:
    measured = [t for run in times for t in run[1:]]
    s = statistics.median(measured)
    return {"s_per_iteration": s, "samples_per_s": batch / s,
            "warmup_s": [run[0] for run in times], "iteration_s": measured}


# Per workload: (batch, micro-batch, response length, PPO epochs, vocab, iterations, rounds)
DEFAULTS = {"natural": (16, 4, 192, 1, 32, 2, 2), "fixed": (64, 16, 64, 2, 0, 3, 2)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=tuple(DEFAULTS), default="natural")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, help="samples per iteration (one mini-batch)")
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--response-length", type=int, help="fixed: every response's length; "
                    "natural: the cap")
    ap.add_argument("--ppo-epochs", type=int)
    ap.add_argument("--vocab", type=int, help="natural: model vocabulary (EOS ~ 1/V a step)")
    ap.add_argument("--fusedrl-variant", default="all",
                    help="natural: fusedrl's configuration, a variant of bench/e2e.py")
    ap.add_argument("--iterations", type=int, help="measured, after one warm-up")
    ap.add_argument("--rounds", type=int, help="alternating fusedrl/TRL runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer.json")
    a = ap.parse_args()
    names = ("batch", "micro_batch", "response_length", "ppo_epochs", "vocab", "iterations",
             "rounds")
    for name, default in zip(names, DEFAULTS[a.workload]):
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.batch % a.micro_batch:
        ap.error(f"--batch {a.batch} must be a multiple of --micro-batch {a.micro_batch}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if not TRL_PYTHON.exists():
        result = {"benchmark": "peer",
                  "skipped": f"{TRL_VENV.name} is missing: run `make bench-peer-env` to install "
                             f"trl==0.29.1 (the last TRL with PPO) in its own environment"}
        a.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return
    if a.workload == "natural":
        sys.path.insert(0, str(ROOT / "bench"))
        from e2e import VARIANTS

        if a.fusedrl_variant not in VARIANTS:
            ap.error(f"--fusedrl-variant: unknown variant {a.fusedrl_variant!r}; known: "
                     f"{','.join(VARIANTS)}")

    load_start = os.getloadavg()
    runs: dict[str, list[list[float]]] = {"fusedrl": [], "trl": []}
    versions = {}
    lengths = {}
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        w = build_workload(a.preset, Path(tmp), vocab_size=a.vocab)
        if a.workload == "natural":
            lengths["fusedrl_engine_initial_actor"] = length_stats(
                natural_lengths(w, a, 4 * a.batch), a.response_length)
            print("fusedrl engine, initial actor, response lengths:",
                  json.dumps(lengths["fusedrl_engine_initial_actor"]), flush=True)
        for r in range(a.rounds):
            order = ("fusedrl", "trl") if r % 2 == 0 else ("trl", "fusedrl")
            for side in order:
                t = run_fusedrl(w, a) if side == "fusedrl" else run_trl(w, a, Path(tmp))
                runs[side].append(t)
                print(f"round {r} {side}: " + ", ".join(f"{x:.2f}s" for x in t), flush=True)
        versions = json.loads(subprocess.run(
            [str(TRL_PYTHON), "-c", "import json,torch,trl,transformers;print(json.dumps("
             "{'trl':trl.__version__,'transformers':transformers.__version__,"
             "'torch':torch.__version__}))"], capture_output=True, text=True).stdout)
    lengths["trl_generated"] = length_stats(TRL_LENGTHS, a.response_length)
    fused = summarize(runs["fusedrl"], a.batch)
    peer = summarize(runs["trl"], a.batch)
    natural = a.workload == "natural"
    result = {
        "benchmark": "peer", "cores": os.cpu_count(),
        "load_avg": {"start": list(load_start), "end": list(os.getloadavg())},
        "workload": {"kind": a.workload, "preset": a.preset, "params": w["params"],
                     "vocab_size": w["vocab_size"], "task": "repeat",
                     "prompt_len": w["prompt_len"], "batch": a.batch, "mini_batch": a.batch,
                     "micro_batch": a.micro_batch, "response_length": a.response_length,
                     "ppo_epochs": a.ppo_epochs, "iterations": a.iterations,
                     "rounds": a.rounds,
                     "lengths": ("sampled until EOS (random-init model: geometric, ~1/V a "
                                 "step), capped" if natural else "forced, fixed")},
        "response_lengths": lengths,
        "sides": {"fusedrl": ("2 devices (Ray workers, 1 core each), bench/e2e.py variant "
                              f"{a.fusedrl_variant!r}" if natural
                              else "single-device trainer, 1 thread"),
                  "trl": ("defaults: torch on every core, stop_token=eos" if natural
                          else "1 thread, no stop token")},
        "fusedrl_overrides": [o for o in fusedrl_overrides(w, a) if "/" not in o],
        "trl_env": versions,
        "fusedrl": fused, "trl": peer,
        "ratio_fusedrl_over_trl": fused["samples_per_s"] / peer["samples_per_s"],
    }
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(lengths))
    print(f"load average at start {load_start[0]:.2f}, end {result['load_avg']['end'][0]:.2f}")
    print(f"fusedrl: {fused['s_per_iteration']:.2f} s/it, {fused['samples_per_s']:.2f} samples/s")
    print(f"TRL    : {peer['s_per_iteration']:.2f} s/it, {peer['samples_per_s']:.2f} samples/s")
    print(f"fusedrl/TRL: x{result['ratio_fusedrl_over_trl']:.2f}")


if __name__ == "__main__":
    main()
