"""A custom rule reward registered by name: shorter responses score higher.

    fusedrl train --plugin examples/brevity_reward.py --set reward.function=brevity

A reward function takes ``(prompt, response, label)`` (the decoded prompt and response,
and the data's label or None) and returns a float. Registered with ``register_reward``
it is named by ``reward.function``; without registering, ``reward.function:
path/file.py:function`` loads a function directly.
"""

from fusedrl.algorithms.rewards import register_reward


@register_reward("brevity")
def brevity(prompt: str, response: str, label: str | None) -> float:
    """1 for an empty response, 1/2 for one character, ... in (0, 1]."""
    return 1.0 / (1.0 + len(response))
