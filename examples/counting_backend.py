"""A custom generation backend: fusedrl's native engine, counting the tokens it
generates and printing the count once per iteration.

    fusedrl train --plugin examples/counting_backend.py --set generation.backend=counting \
        --set cluster.devices=2 --set placement.default=dp2tp1pp1@0-1

A backend is a class registered by name with ``register_backend``; fusedrl builds one
per generation instance (``placement.actor_gen`` replica) as
``Backend(model, max_batch_size=..., max_seq_len=..., eos_token_ids=..., pad_token_id=...,
process_group=...)`` and drives it through the interface of
``fusedrl.generation.backend.GenerationBackend``: ``generate`` for a whole batch, or
``start``/``add``/``step``/``abort`` step by step (inter-stage fusion). On the Ray
runtime the backends live in the workers, so this module must be imported there too:
``--plugin`` (or the config's ``plugins:`` list) does that; a registration made only in
the driver is not seen by the workers.
"""

import os

from fusedrl.generation.backend import NativeBackend, register_backend


@register_backend("counting")
class CountingBackend(NativeBackend):
    """The native engine, plus ``tokens``: response tokens of the samples finished."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.tokens = 0
        self.iterations = 0

    def _count(self, samples):
        self.tokens += sum(len(s.response_ids) for s in samples)
        return samples

    def start(self, params) -> None:
        if self.iterations:
            print(f"counting backend (pid {os.getpid()}): {self.tokens} tokens in "
                  f"{self.iterations} iterations", flush=True)
        self.iterations += 1
        super().start(params)

    def step(self):
        return self._count(super().step())

    def generate(self, requests, params, on_finish=None):
        return self._count(super().generate(requests, params, on_finish))
