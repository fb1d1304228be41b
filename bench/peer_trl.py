"""Peer comparison: one PPO iteration of TRL's PPO trainer against fusedrl on CPU.

    python bench/peer_trl.py [--preset small] [--batch 64] [--micro-batch 16]
                             [--response-length 64] [--ppo-epochs 2] [--iterations 3]
                             [--rounds 2] [--out bench/results/peer.json]

TRL dropped PPO in 1.x; the last PPO trainer is ``trl==0.29.1``
(``trl.experimental.ppo.PPOTrainer``). It lives in its own environment, ``.venv-trl``
(``make bench-peer-env``), never in fusedrl's dependencies: this script runs in
fusedrl's venv, builds the shared workload, runs fusedrl in-process and TRL as a
subprocess of ``.venv-trl/bin/python bench/peer_trl.py --trl-worker SPEC`` that prints
its timings as one JSON line. Without ``.venv-trl`` it writes ``{"skipped": reason}``
and exits 0.

Same work on both sides:

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


def build_workload(preset: str, directory: Path, seed: int = 0) -> dict:
    """Actor and value checkpoints plus the tokenized prompts, written under ``directory``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fusedrl.data.builtin import TASKS
    from fusedrl.models import PRESETS, ModelConfig
    from fusedrl.models.build import build_model
    from fusedrl.models.checkpoint import config_to_hf, save_hf_checkpoint
    from fusedrl.models.tokenizer import CharTokenizer

    task = TASKS["repeat"]
    chars = CharTokenizer(task.alphabet)
    vocab = {"<pad>": chars.PAD, "<bos>": chars.BOS, "<eos>": chars.EOS}
    vocab.update({c: chars.encode(c)[0] for c in chars.alphabet})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", chars.BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", padding_side="left")

    config = ModelConfig(**{**PRESETS[preset].to_dict(), "vocab_size": chars.vocab_size})
    actor = build_model(config, "lm", seed=seed).hf_state_dict()
    value = build_model(config, "value", seed=seed + 1).hf_state_dict()
    gen = torch.Generator().manual_seed(seed + 2)
    value["score.weight"] = torch.randn(value["score.weight"].shape, generator=gen) * 0.02

    actor_dir, value_dir = directory / "actor", directory / "value"
    save_hf_checkpoint(actor_dir, config, actor, head="lm", tokenizer=tok)
    save_hf_checkpoint(value_dir, config, value, head="value", tokenizer=tok)
    hf = config_to_hf(config, "value")
    hf.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
              pad_token_id=chars.PAD, bos_token_id=chars.BOS, eos_token_id=chars.EOS)
    (value_dir / "config.json").write_text(json.dumps(hf, indent=2))

    prompts = [tok(r.prompt).input_ids for r in task.build(4096, seed)]
    ref = [chars.render_prompt(r.prompt) for r in task.build(len(prompts), seed)]
    assert prompts == ref, "HF tokenizer disagrees with fusedrl's CharTokenizer"
    return {"actor": str(actor_dir), "value": str(value_dir), "prompts": prompts,
            "params": config.num_params(), "vocab_size": config.vocab_size,
            "prompt_len": max(map(len, prompts))}


# -------------------------------------------------------------------------- fusedrl


def run_fusedrl(w: dict, a: argparse.Namespace) -> list[float]:
    """Seconds of each of ``1 + a.iterations`` fusedrl iterations (first = warm-up)."""
    import torch

    from fusedrl.config import load_config
    from fusedrl.runtime.launch import make_trainer

    torch.set_num_threads(1)
    cfg = load_config(None, [
        f"model.path={w['actor']}", f"model.critic_path={w['value']}",
        "reward.type=model", f"reward.model_path={w['value']}",
        "data.task=repeat", f"data.max_prompt_len={w['prompt_len']}",
        f"generation.max_new_tokens={a.response_length}",
        f"generation.forced_lengths=fixed:{a.response_length}",
        f"generation.max_batch_size={a.micro_batch}", "generation.temperature=1.0",
        f"ppo.rollout_batch_size={a.batch}", f"ppo.mini_batch_size={a.batch}",
        f"ppo.micro_batch_size={a.micro_batch}", f"ppo.ppo_epochs={a.ppo_epochs}",
        "trainer.seed=0"])
    trainer = make_trainer(cfg)
    try:
        return [trainer.step()["timing_s/step"] for _ in range(1 + a.iterations)]
    finally:
        trainer.close()


# ------------------------------------------------------------------------------ TRL


def run_trl(w: dict, a: argparse.Namespace, workdir: Path) -> list[float]:
    """Seconds of each TRL iteration, from a ``.venv-trl`` subprocess."""
    spec = workdir / "trl_spec.json"
    spec.write_text(json.dumps({**w, "batch": a.batch, "micro_batch": a.micro_batch,
                                "response_length": a.response_length,
                                "ppo_epochs": a.ppo_epochs, "iterations": a.iterations,
                                "output_dir": str(workdir / "trl-out")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([str(TRL_PYTHON), __file__, "--trl-worker", str(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    if line["response_lengths"] != [a.response_length]:
        raise RuntimeError(f"TRL generated responses of lengths {line['response_lengths']}, "
                           f"not exactly {a.response_length} tokens")
    return line["iteration_s"]


def trl_worker(spec_path: str) -> None:
    """Inside ``.venv-trl``: run TRL PPO for 1 + iterations updates, print timings."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    s = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(s["actor"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["actor"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(s["actor"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(s["value"], num_labels=1,
                                                               dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(s["value"], num_labels=1,
                                                                dtype=torch.float32)
    # Record every generated response length, to check the workload really is fixed-length.
    generated: set[int] = set()
    generate = policy.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        generated.add(out.sequences.shape[1] - prompt.shape[1])
        return out

    policy.generate = recording_generate
    b, m, n = s["batch"], s["micro_batch"], 1 + s["iterations"]
    args = PPOConfig(
        output_dir=s["output_dir"], report_to="none", use_cpu=True, seed=0,
        per_device_train_batch_size=m, gradient_accumulation_steps=b // m,
        num_mini_batches=1, num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=m, response_length=s["response_length"],
        stop_token=None, temperature=1.0, total_episodes=b * n,
        num_sample_generations=0, save_strategy="no", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0)
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
    print(json.dumps({"iteration_s": times, "response_lengths": sorted(generated),
                      "trl": trl.__version__,
                      "transformers": transformers.__version__, "torch": torch.__version__}))


# ----------------------------------------------------------------------------- main


def summarize(times: list[list[float]], batch: int, tokens: int) -> dict:
    measured = [t for run in times for t in run[1:]]
    s = statistics.median(measured)
    return {"s_per_iteration": s, "samples_per_s": batch / s, "tokens_per_s": tokens / s,
            "warmup_s": [run[0] for run in times], "iteration_s": measured}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=3, help="measured, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="alternating fusedrl/TRL runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer.json")
    a = ap.parse_args()
    if a.batch % a.micro_batch:
        ap.error("--batch must be a multiple of --micro-batch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if not TRL_PYTHON.exists():
        result = {"benchmark": "peer",
                  "skipped": f"{TRL_VENV.name} is missing: run `make bench-peer-env` to install "
                             f"trl==0.29.1 (the last TRL with PPO) in its own environment"}
        a.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return

    runs: dict[str, list[list[float]]] = {"fusedrl": [], "trl": []}
    versions = {}
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        w = build_workload(a.preset, Path(tmp))
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
    tokens = a.batch * (w["prompt_len"] + a.response_length)
    fused = summarize(runs["fusedrl"], a.batch, tokens)
    peer = summarize(runs["trl"], a.batch, tokens)
    result = {
        "benchmark": "peer", "cores": os.cpu_count(), "threads": 1,
        "load_average_1m": os.getloadavg()[0],
        "workload": {"preset": a.preset, "params": w["params"], "task": "repeat",
                     "prompt_len": w["prompt_len"], "batch": a.batch, "mini_batch": a.batch,
                     "micro_batch": a.micro_batch, "response_length": a.response_length,
                     "ppo_epochs": a.ppo_epochs, "iterations": a.iterations,
                     "rounds": a.rounds},
        "trl_env": versions,
        "fusedrl": fused, "trl": peer,
        "ratio_fusedrl_over_trl": fused["samples_per_s"] / peer["samples_per_s"],
    }
    a.out.write_text(json.dumps(result, indent=2))
    print(f"fusedrl: {fused['s_per_iteration']:.2f} s/it, {fused['samples_per_s']:.2f} samples/s")
    print(f"TRL    : {peer['s_per_iteration']:.2f} s/it, {peer['samples_per_s']:.2f} samples/s")
    print(f"fusedrl/TRL: x{result['ratio_fusedrl_over_trl']:.2f}")


if __name__ == "__main__":
    main()
