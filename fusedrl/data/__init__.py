"""Prompt datasets (jsonl / parquet) and built-in tasks."""

from fusedrl.data.prompts import (
    SUFFIXES,
    DataError,
    Prompt,
    PromptRecord,
    format_prompt,
    load_prompts,
)
from fusedrl.data.tasks import TASKS, arithmetic_task

__all__ = [
    "SUFFIXES",
    "DataError",
    "Prompt",
    "PromptRecord",
    "format_prompt",
    "load_prompts",
    "TASKS",
    "arithmetic_task",
]
