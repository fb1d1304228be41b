"""Built-in tasks that need no download.

``arithmetic_task``: two-operand addition prompts (``What is 37+58?``, label
``"95"``), scored by :func:`fusedrl.algorithms.rewards.arithmetic_reward`
(1.0 for the right number).
"""

from __future__ import annotations

import random

from fusedrl.data.prompts import PromptRecord

__all__ = ["arithmetic_task", "TASKS"]


def arithmetic_task(n: int, seed: int = 0, max_operand: int = 99) -> list[PromptRecord]:
    """``n`` addition problems with operands uniform in ``[0, max_operand]``.

    Deterministic in ``seed`` (a private ``random.Random``; the global RNG is not
    touched), and a prefix of a longer task with the same seed.
    """
    if n < 0:
        raise ValueError(f"arithmetic_task: n must be >= 0, got {n}")
    if max_operand < 0:
        raise ValueError(f"arithmetic_task: max_operand must be >= 0, got {max_operand}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        records.append(PromptRecord(prompt=f"What is {a}+{b}?", label=str(a + b)))
    return records


# Task name -> builder(n, seed), for configs that name a built-in task.
TASKS = {"arithmetic": arithmetic_task}
