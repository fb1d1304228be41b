"""Training checkpoints: ``DIR/checkpoints/iter_N/`` with Hugging Face-loadable
``actor/`` and ``critic/`` safetensors directories and ``trainer_state.pt``
(optimizers, KL controller, RNG, iteration, and which runtime and placements wrote
it). Each ``iter_N`` is written atomically (``.iter_N.tmp-*`` renamed into place);
:func:`clean_checkpoint_dir` removes what a killed write or prune left behind, and
:func:`check_resumable` refuses, in one line, a checkpoint this run cannot continue."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from fusedrl.models.checkpoint import CheckpointError, atomic_dir

_ITER_RE = re.compile(r"^iter_(\d+)$")
# Left by a killed run: an atomic write's temporary directory, the old copy a rewrite
# moves aside, and a checkpoint being pruned (renamed before it is deleted).
_LEFTOVER_RE = re.compile(r"^\.iter_(\d+)\.(tmp-.*|old|del-.*)$")


def checkpoint_dir(out: Path, iteration: int) -> Path:
    return out / "checkpoints" / f"iter_{iteration}"


def save_training_checkpoint(out: Path, trainer) -> Path:
    """``out/checkpoints/iter_N``: the update stage writes ``actor/``, ``critic/`` and its
    optimizer state (the Ray runtime: per-rank shards in ``optim/``, from the workers;
    the directory must then be on storage they reach); ``trainer_state.pt`` records the
    iteration, KL controller, RNG and which runtime and placements wrote it
    (:func:`check_resumable` refuses the other kind)."""
    final = checkpoint_dir(out, trainer.iteration)
    with atomic_dir(final) as tmp:
        extra = trainer.stages.update.save(tmp, trainer.setup.tokenizer)
        torch.save({**trainer.state_dict(), **extra}, tmp / "trainer_state.pt")
        # Ready for transformers as it is: generate() stops where the engine stops, the
        # value heads load exactly (fusedrl.models.checkpoint.write_inference_files).
        from fusedrl.models.checkpoint import make_inference_ready

        make_inference_ready(tmp, trainer.setup.tokenizer, trainer.config.generation)
    return final


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``iter_N`` holding ``trainer_state.pt``), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _ITER_RE.match(p.name)) and (p / "trainer_state.pt").exists())


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def clean_checkpoint_dir(out: Path) -> list[str]:
    """Remove what killed checkpoint writes and prunes left in ``out/checkpoints``
    (``.iter_N.tmp-*``, ``.iter_N.del-*``); an ``.iter_N.old`` whose ``iter_N`` is
    missing (killed between the two renames of a rewrite) is put back. Returns the
    names handled. Call with the run directory's lock held."""
    root = out / "checkpoints"
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _LEFTOVER_RE.match(p.name)
        if not m:
            continue
        final = checkpoint_dir(out, int(m.group(1)))
        if m.group(2) == "old" and not final.exists():
            os.replace(p, final)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(p.name)
    return done


def prune_checkpoints(out: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0: keep all), never ``protect``
    (the checkpoint this run resumed from). Each is renamed to ``.iter_N.del-*`` first,
    so a kill mid-delete never leaves a partial ``iter_N`` that looks complete."""
    if keep <= 0:
        return []
    found = list_checkpoints(out)
    removed = []
    protect = protect.resolve() if protect is not None else None
    for n, p in found[:-keep]:
        if protect is not None and p.resolve() == protect:
            continue
        doomed = p.with_name(f".{p.name}.del-{os.getpid()}")
        os.replace(p, doomed)
        shutil.rmtree(doomed)
        removed.append(p)
    return removed


def read_trainer_state(path: Path) -> dict:
    """``path/trainer_state.pt`` as a dict with the runtime that wrote it, or a
    :class:`CheckpointError` (one line naming the file) if it is unreadable or not a
    fusedrl trainer state. Checkpoints older than the ``runtime`` key: a Ray one has
    ``placements`` and optimizer shards in ``optim/``, a single-device one the
    optimizer states themselves."""
    file = path / "trainer_state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise CheckpointError(f"{file}: unreadable, not a trainer state ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        what = (f"keys {sorted(map(str, state))[:6]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise CheckpointError(f"{file}: not a fusedrl trainer state ({what}, no integer "
                              f"'iteration')")
    if "runtime" not in state:
        if "actor_opt" in state and "critic_opt" in state:
            state["runtime"] = "single"
        elif "placements" in state:
            state["runtime"] = "ray"
        else:
            raise CheckpointError(f"{file}: not a fusedrl trainer state (no optimizer states "
                                  f"and no placements; keys {sorted(map(str, state))[:6]})")
    return state


def check_resumable(path: Path, config) -> dict:
    """The trainer state of checkpoint ``path`` if this ``config`` can continue it, else a
    :class:`CheckpointError` in one line: written by the other runtime (single-device vs
    Ray, whose optimizer states differ in kind), or by the Ray runtime with other
    placements (its optimizer shards fit only those), or missing its weights."""
    from fusedrl.runtime.launch import is_single_device

    state = read_trainer_state(path)
    want = "single" if is_single_device(config) else "ray"
    saved = state["runtime"]
    if saved != want:
        kinds = {"single": "the single-device trainer (cluster.devices=1, trivial placements)",
                 "ray": "the Ray runtime"}
        raise CheckpointError(f"{path}: written by {kinds[saved]}, this run uses {kinds[want]}; "
                              f"resume with the cluster.devices and placement.* it was saved "
                              f"with")
    if saved == "ray":
        placements = state.get("placements") or {}
        diff = {r: (p, str(config.placement.of(r))) for r, p in placements.items()
                if p != str(config.placement.of(r))}
        if diff:
            r, (old, new) = next(iter(diff.items()))
            raise CheckpointError(f"{path}: saved with placement.{r}={old}, this run has "
                                  f"{new} ({len(diff)} placement(s) differ); resume with the "
                                  f"placements it was saved with")
        if not (path / "optim").is_dir():
            raise CheckpointError(f"{path}: optimizer shards optim/ missing")
    from fusedrl.validate import uses_critic

    for part in ("actor", "critic") if uses_critic(config) else ("actor",):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path}: {part}/ weights missing")
    return state


def load_training_checkpoint(path: Path, trainer) -> None:
    """Restore weights, optimizer states, KL controller, RNG and iteration, then bring
    every copy that generates or infers to the restored weights."""
    state = check_resumable(path, trainer.config)
    trainer.stages.update.load(path, state)
    trainer.stages.weight_sync.after_load()
    trainer.load_state_dict(state)
