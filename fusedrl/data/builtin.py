"""Built-in tasks (no download): prompts, their rule reward and, for tasks that train
a model from scratch, the character alphabet of their tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from fusedrl.algorithms.rewards import arithmetic_reward
from fusedrl.data.prompts import PromptRecord
from fusedrl.data.tasks import arithmetic_task

REPEAT_LETTERS = "abcd"
REPEAT_PROMPT_LEN = 4


def repeat_task(n: int, seed: int = 0) -> list[PromptRecord]:
    """``cadb>``: answer by repeating the prompt's first letter (label ``c``)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = "".join(rng.choice(REPEAT_LETTERS) for _ in range(REPEAT_PROMPT_LEN))
        records.append(PromptRecord(prompt=word + ">", label=word[0]))
    return records


def repeat_reward(prompt: str, response: str, label: str | None) -> float:
    """Fraction of the first ``REPEAT_ANSWER_LEN`` response characters equal to the label.

    A random policy scores about 1/|vocab|; stopping early or a wrong letter costs
    reward, so the optimum (1.0) is to emit the prompt's first letter every time.
    """
    target = label if label is not None else prompt[:1]
    head = response[:REPEAT_ANSWER_LEN]
    return sum(c == target for c in head) / REPEAT_ANSWER_LEN


REPEAT_ANSWER_LEN = 8


@dataclass(frozen=True)
class Task:
    """A built-in task."""

    build: Callable[[int, int], list[PromptRecord]]
    """(n, seed) -> prompts."""
    reward: Callable[[str, str, str | None], float]
    """Rule reward of the task."""
    alphabet: str | None = None
    """Character alphabet for a from-scratch model; None: use the model's tokenizer."""


TASKS: dict[str, Task] = {
    "repeat": Task(repeat_task, repeat_reward, alphabet=REPEAT_LETTERS + ">"),
    "arithmetic": Task(arithmetic_task, arithmetic_reward,
                       alphabet="0123456789+=? Whatis"),
}
