"""Training checkpoints: ``DIR/checkpoints/iter_N/`` with Hugging Face-loadable
``actor/`` and ``critic/`` safetensors directories and ``trainer_state.pt``
(optimizers, KL controller, RNG, iteration). Each ``iter_N`` is written atomically."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fusedrl.models.checkpoint import CheckpointError, atomic_dir, save_hf_checkpoint

_ITER_RE = re.compile(r"^iter_(\d+)$")


def checkpoint_dir(out: Path, iteration: int) -> Path:
    return out / "checkpoints" / f"iter_{iteration}"


def save_training_checkpoint(out: Path, trainer) -> Path:
    final = checkpoint_dir(out, trainer.iteration)
    mc = trainer.setup.model_config
    with atomic_dir(final) as tmp:
        save_hf_checkpoint(tmp / "actor", mc, trainer.actor.hf_state_dict(), "lm",
                           trainer.setup.tokenizer)
        save_hf_checkpoint(tmp / "critic", mc, trainer.critic.hf_state_dict(), "value")
        torch.save(trainer.state_dict(), tmp / "trainer_state.pt")
    return final


def latest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ITER_RE.match(p.name)) and (p / "trainer_state.pt").exists()]
    return max(found)[1] if found else None


def load_training_checkpoint(path: Path, trainer) -> None:
    """Restore weights, optimizer states, KL controller, RNG and iteration."""
    from fusedrl.models.build import load_full_state
    from fusedrl.models.checkpoint import load_safetensors_dir

    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path / 'trainer_state.pt'}: unreadable ({e})") from None
    _, actor = load_safetensors_dir(path / "actor")
    _, critic = load_safetensors_dir(path / "critic")
    load_full_state(trainer.actor, actor)
    load_full_state(trainer.critic, critic)
    trainer.load_state_dict(state)
