"""Llama-family models, their sharding and checkpoint loading."""

from fusedrl.models.config import PRESETS, ModelConfig

__all__ = ["ModelConfig", "PRESETS"]
