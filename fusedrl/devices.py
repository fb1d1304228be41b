"""Where the single-device trainer's tensors live: one place for device choice and
synchronisation before timers.

Everything else in fusedrl is written device-generically (tensors are created on the
device of the tensors they combine with), so the same code runs on CPU in tests and on
CUDA; the CUDA-only calls are the few guarded ones below. Checkpoints need no help
here: ``save_hf_checkpoint`` writes CPU copies, and ``torch.load(map_location="cpu")``
plus the optimizers' ``load_state_dict`` put state back on the parameters' device.
"""

from __future__ import annotations

import time

import torch


def resolve(accelerator: str) -> torch.device:
    """The device of ``cluster.accelerator`` (``cpu`` or ``cuda``); a
    :class:`~fusedrl.config.ConfigError` naming the key when it cannot be used here."""
    from fusedrl.config import ConfigError

    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key cluster.accelerator={accelerator!r}: no CUDA device "
                              f"is available (torch {torch.__version__}, CUDA build: "
                              f"{torch.version.cuda or 'no'})")
        return torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(f"config key cluster.accelerator={accelerator!r}: must be cpu or cuda")


def device_of(config) -> torch.device:
    """The device a :class:`~fusedrl.config.Config`'s single-device trainer runs on."""
    return resolve(config.cluster.accelerator)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a timer read after it counts that work.

    CUDA kernels run asynchronously: without this a stage's timer would stop when the
    kernels are queued and the next stage would be billed for them. A no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device's queued work finished."""
    synchronize(device)
    return time.perf_counter()


__all__ = ["resolve", "device_of", "synchronize", "timer"]
