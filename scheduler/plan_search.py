"""Search over execution plans: every call's device mesh, layout and micro-batches.

The search space (ReaLHF, arXiv 2406.14088 §4): each model function call gets a
*device mesh* -- a buddy-aligned block of consecutive devices: a power-of-two
part of one node, or whole nodes (``size`` devices starting at a multiple of
``size``) -- a (dp, tp, pp) layout of that mesh the model can take (tp within a
node), a micro-batch count, and the plan's fusion switches.

Starting points are the placement strategies of Xiao et al. (arXiv 2312.11819),
each with its layouts tuned by coordinate descent on the same cost:

* **flattening** -- all calls on all devices with one layout (the common baseline);
* **interleaving** -- models without a dependency between them on exclusive
  devices: actor and reference on one half, critic and reward on the other (the
  inference calls run side by side, so do the two trainings);
* **separation** -- generation on its own devices with a generation copy of the
  actor, training on the others; inference beside generation or beside training;

and a **Megatron-style heuristic** (ReaLHF's baseline): flattening with tp = the
largest that fits a node, pp the smallest that fits memory, dp the rest,
micro-batch size 1, no fusion.

From the best starts, simulated annealing (ReaLHF's MCMC, with a cooling
schedule and restarts from the best) moves one call at a time -- new layout,
new mesh, same placement as another call, new micro-batch count, toggled fusion,
one placement for a fusion group (generation + inference, or the two trainings)
-- over a cache of evaluated plans; two chains run in two processes. The cost is
injected (``cost(plan) -> Score``; :mod:`fusedrl.sim.plan_eval` provides the
simulator's), so this module stays torch-free. A plan that does not fit memory
is penalised by its overflow (ReaLHF's OOM penalty) and never returned as best.

Deterministic for a seed when the chains stop on ``max_steps``; a binding
``time_limit`` cuts them at machine-dependent points.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from fusedrl.layout import ParallelLayout, Placement

from .plan import CALLS, INFER_CALLS, TRAIN_CALLS, CallPlan, ExecutionPlan, Fusion

GEN_CALL = "actor_gen"

STRATEGIES = ("flattening", "interleaving", "separation")
"""Xiao et al.'s placement strategies (arXiv 2312.11819 §3)."""


@dataclass(frozen=True)
class Score:
    """What the search needs to know of a plan."""

    time_s: float
    """Predicted iteration seconds."""
    overflow_bytes: float = 0.0
    """How far the fullest device is over its usable memory (0: the plan fits)."""
    capacity_bytes: float = 1.0
    """Usable memory of a device (scales the penalty)."""

    @property
    def fits(self) -> bool:
        return self.overflow_bytes <= 0

    @property
    def energy(self) -> float:
        """Annealing energy: time, times a penalty growing with the overflow."""
        if self.fits:
            return self.time_s
        return self.time_s * (2.0 + 10.0 * self.overflow_bytes / self.capacity_bytes)


CostFn = Callable[[ExecutionPlan], Score]


# ------------------------------------------------------------------------------ space


def device_meshes(num_devices: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """``(start, size)`` of every buddy-aligned mesh: sizes dividing a node (and
    dividing it evenly) or whole nodes, starting at a multiple of the size."""
    g = min(gpus_per_node, num_devices)
    sizes = [s for s in range(1, num_devices + 1) if num_devices % s == 0
             and ((s <= g and g % s == 0) or s % g == 0)]
    return [(start, s) for s in sizes for start in range(0, num_devices - s + 1, s)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchSpace:
    """Meshes, layouts per call and mesh size, micro-batch options, fusion options."""

    num_devices: int
    gpus_per_node: int
    layouts: dict[str, dict[int, tuple[ParallelLayout, ...]]]
    """Per call and mesh size, the layouts the call's model can take."""
    batch_size: int
    mini_batch_size: int
    fusion_options: tuple[Fusion, ...] = (
        Fusion(False, "rlhfuse", "sequential"), Fusion(True, "rlhfuse", "sequential"),
        Fusion(False, "rlhfuse", "fused"), Fusion(True, "rlhfuse", "fused"))
    max_infer_chunks: int = 8
    meshes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.meshes:
            self.meshes = device_meshes(self.num_devices, self.gpus_per_node)
        sizes = {s for _, s in self.meshes}
        for c in CALLS:
            if not any(self.layouts.get(c, {}).get(s) for s in sizes):
                raise ValueError(f"search space: no layout of any mesh fits call {c}")

    @classmethod
    def build(cls, num_devices: int, gpus_per_node: int,
              layout_ok: Callable[[str, ParallelLayout], bool], batch_size: int,
              mini_batch_size: int, **kw) -> "SearchSpace":
        """Every (dp, tp, pp) of every mesh size with tp a power of two within a node
        (tp all-reduces stay on NVLink) that ``layout_ok(call, layout)`` accepts."""
        meshes = kw.pop("meshes", None) or device_meshes(num_devices, gpus_per_node)
        layouts: dict[str, dict[int, tuple[ParallelLayout, ...]]] = {c: {} for c in CALLS}
        for size in sorted({s for _, s in meshes}):
            cands = []
            tp = 1
            while tp <= min(gpus_per_node, size):
                if size % tp == 0:
                    for pp in _divisors(size // tp):
                        cands.append(ParallelLayout(size // (tp * pp), tp, pp))
                tp *= 2
            for c in CALLS:
                layouts[c][size] = tuple(lt for lt in cands if layout_ok(c, lt))
        return cls(num_devices, gpus_per_node, layouts, batch_size, mini_batch_size,
                   meshes=meshes, **kw)

    def micro_batch_options(self, call: str, layout: ParallelLayout) -> tuple[int, ...]:
        """Training: micro-batch counts dividing the mini-batch's share of a dp rank;
        inference: powers of two up to ``max_infer_chunks`` dividing the rank's
        share of the batch; generation: 1."""
        if call in TRAIN_CALLS:
            per_rank, rem = divmod(self.mini_batch_size, layout.dp)
            return tuple(_divisors(per_rank)) if not rem and per_rank else ()
        if call in INFER_CALLS:
            per_rank = -(-self.batch_size // layout.dp)
            out, k = [], 1
            while k <= min(self.max_infer_chunks, per_rank):
                out.append(k)
                k *= 2
            return tuple(out)
        return (1,)

    def options(self, call: str, size: int) -> list[tuple[ParallelLayout, int]]:
        """(layout, micro_batches) pairs of ``call`` on a mesh of ``size`` devices."""
        return [(lt, mb) for lt in self.layouts[call].get(size, ())
                for mb in self.micro_batch_options(call, lt)]

    def valid(self, call: str, cp: CallPlan) -> bool:
        lt, devs = cp.placement.layout, cp.placement.devices
        start, size = devs[0], len(devs)
        return ((start, size) in self._mesh_set and devs == tuple(range(start, start + size))
                and lt in self.layouts[call].get(size, ())
                and cp.micro_batches in self.micro_batch_options(call, lt))

    @property
    def _mesh_set(self) -> set[tuple[int, int]]:
        if not hasattr(self, "_meshes_cached"):
            self._meshes_cached = set(self.meshes)
        return self._meshes_cached

    def size(self) -> int:
        """Number of plans in the space."""
        per_call = [sum(len(self.options(c, s)) for _, s in self.meshes) for c in CALLS]
        return math.prod(per_call) * len(self.fusion_options)


def _call(start: int, layout: ParallelLayout, mb: int) -> CallPlan:
    return CallPlan(Placement(layout, tuple(range(start, start + layout.world_size))), mb)


def enumerate_plans(space: SearchSpace) -> Iterator[ExecutionPlan]:
    """Every plan of ``space`` (for brute force on small cases)."""
    import itertools

    per_call = [[_call(start, lt, mb) for start, size in space.meshes
                 for lt, mb in space.options(c, size)] for c in CALLS]
    for combo in itertools.product(*per_call):
        for f in space.fusion_options:
            yield ExecutionPlan(space.num_devices, tuple(zip(CALLS, combo)), f, "enumerated")


def brute_force(space: SearchSpace, cost: CostFn) -> tuple[ExecutionPlan | None, Score | None]:
    """The best fitting plan of the space by evaluating all of them."""
    best, best_s = None, None
    for p in enumerate_plans(space):
        s = cost(p)
        if s.fits and (best_s is None or s.time_s < best_s.time_s):
            best, best_s = p, s
    return best, best_s


# ----------------------------------------------------------------------------- cache


class CachedCost:
    """``cost`` memoised by :meth:`ExecutionPlan.key` (counts evaluations)."""

    def __init__(self, cost: CostFn):
        self.cost, self.cache, self.evaluations = cost, {}, 0

    def __call__(self, plan: ExecutionPlan) -> Score:
        k = plan.key()
        s = self.cache.get(k)
        if s is None:
            s = self.cost(plan)
            self.cache[k] = s
            self.evaluations += 1
        return s


def _better(a: Score, b: Score | None) -> bool:
    if b is None:
        return True
    if a.fits != b.fits:
        return a.fits
    return a.energy < b.energy


# ------------------------------------------------------------------------ strategies


def tune(plan: ExecutionPlan, space: SearchSpace, cost: CostFn, *, sweeps: int = 2,
         fixed_layouts: bool = False, deadline: float = math.inf) -> tuple[ExecutionPlan, Score]:
    """Coordinate descent with the meshes fixed: each call's (layout, micro-batches)
    in turn, then the fusion switches, ``sweeps`` times or until nothing improves.
    ``fixed_layouts`` keeps the layouts and tunes micro-batches and fusion only."""
    best, best_s = plan, cost(plan)
    for _ in range(sweeps):
        improved = False
        for c in CALLS:
            cp = best[c]
            start, size = cp.placement.devices[0], len(cp.placement.devices)
            if fixed_layouts:
                opts = [(cp.placement.layout, mb)
                        for mb in space.micro_batch_options(c, cp.placement.layout)]
            else:
                opts = space.options(c, size)
            for lt, mb in opts:
                if time.time() > deadline:
                    return best, best_s
                cand = best.replace_call(c, _call(start, lt, mb))
                s = cost(cand)
                if _better(s, best_s):
                    best, best_s, improved = cand, s, True
        for f in space.fusion_options:
            cand = best.with_fusion(f)
            s = cost(cand)
            if _better(s, best_s):
                best, best_s, improved = cand, s, True
        if not improved:
            break
    return best, best_s


def _on_meshes(space: SearchSpace, meshes: Mapping[str, tuple[int, int]], name: str
               ) -> ExecutionPlan | None:
    """Plan with the given mesh per call, each call on its first (layout,
    micro-batches) option there (:func:`tune` then picks them); ``None`` when some
    call has no layout on its mesh."""
    calls = {}
    for c in CALLS:
        start, size = meshes[c]
        opts = space.options(c, size)
        if not opts:
            return None
        calls[c] = _call(start, *opts[0])
    return ExecutionPlan.make(space.num_devices, calls, Fusion(), name)


def flattening(space: SearchSpace, cost: CostFn, deadline: float = math.inf
               ) -> tuple[ExecutionPlan, Score] | None:
    """All calls on all devices, one layout for all (Xiao et al. §3, the common
    baseline): the best such layout, micro-batches and fusion tuned."""
    n = space.num_devices
    common = [lt for lt in space.layouts[CALLS[0]].get(n, ())
              if all(lt in space.layouts[c].get(n, ()) and space.micro_batch_options(c, lt)
                     for c in CALLS)]
    best = None
    for lt in common:
        plan = ExecutionPlan.make(n, {c: _call(0, lt, space.micro_batch_options(c, lt)[-1]
                                               if c in TRAIN_CALLS else 1) for c in CALLS},
                                  Fusion(), "flattening")
        cand = tune(plan, space, cost, sweeps=1, fixed_layouts=True, deadline=deadline)
        if best is None or _better(cand[1], best[1]):
            best = cand
    return best


def _halves(space: SearchSpace) -> tuple[tuple[int, int], tuple[int, int]] | None:
    half = space.num_devices // 2
    a, b = (0, half), (half, half)
    if space.num_devices % 2 or a not in space._mesh_set or b not in space._mesh_set:
        return None
    return a, b


def interleaving(space: SearchSpace, cost: CostFn, deadline: float = math.inf
                 ) -> tuple[ExecutionPlan, Score] | None:
    """Models without a dependency on exclusive devices (Xiao et al. §3): actor and
    reference on one half, critic and reward on the other."""
    halves = _halves(space)
    if halves is None:
        return None
    a, b = halves
    meshes = {"actor_gen": a, "actor_train": a, "ref": a,
              "critic_infer": b, "critic_train": b, "reward": b}
    made = _on_meshes(space, meshes, "interleaving")
    return None if made is None else tune(made, space, cost, deadline=deadline)


def separation(space: SearchSpace, cost: CostFn, deadline: float = math.inf
               ) -> tuple[ExecutionPlan, Score] | None:
    """Generation on its own devices with a generation copy of the actor, training
    on the others (Xiao et al. §3); inference beside generation or beside training,
    whichever is faster."""
    halves = _halves(space)
    if halves is None:
        return None
    g, t = halves
    best = None
    for infer in (g, t):
        meshes = {"actor_gen": g, "actor_train": t, "critic_train": t,
                  **{c: infer for c in INFER_CALLS}}
        made = _on_meshes(space, meshes, "separation")
        if made is None:
            continue
        cand = tune(made, space, cost, deadline=deadline)
        if best is None or _better(cand[1], best[1]):
            best = cand
    return best


def megatron_heuristic(space: SearchSpace, cost: CostFn) -> tuple[ExecutionPlan, Score] | None:
    """ReaLHF's Megatron-style baseline: every call on all devices with one layout,
    tp the largest that fits in a node, pp the smallest that fits memory, dp the
    rest; micro-batch size 1 in training, one forward per rank in inference; no
    fusion. Not tuned."""
    n = space.num_devices
    common = [lt for lt in space.layouts[CALLS[0]].get(n, ())
              if all(lt in space.layouts[c].get(n, ()) and space.micro_batch_options(c, lt)
                     for c in CALLS)]
    if not common:
        return None
    top_tp = max(lt.tp for lt in common)
    first = None
    for lt in sorted((lt for lt in common if lt.tp == top_tp), key=lambda lt: lt.pp):
        plan = ExecutionPlan.make(n, {c: _call(0, lt, space.micro_batch_options(c, lt)[-1]
                                               if c in TRAIN_CALLS else 1) for c in CALLS},
                                  Fusion(), "heuristic")
        s = cost(plan)
        if first is None:
            first = (plan, s)
        if s.fits:
            return plan, s
    return first


# ---------------------------------------------------------------------------- annealing


@dataclass
class ChainResult:
    best: ExecutionPlan
    score: Score
    steps: int
    evaluations: int
    accepted: int
    seconds: float


class _Mover:
    """Neighbourhood of a plan: one call changed, or the fusion switches."""

    def __init__(self, space: SearchSpace, rng: random.Random):
        self.space, self.rng = space, rng
        self.by_size: dict[int, list[int]] = {}
        for start, size in space.meshes:
            self.by_size.setdefault(size, []).append(start)

    def _valid_mb(self, call: str, lt: ParallelLayout, keep: int) -> int | None:
        opts = self.space.micro_batch_options(call, lt)
        if not opts:
            return None
        return keep if keep in opts else self.rng.choice(opts)

    def move(self, plan: ExecutionPlan) -> ExecutionPlan | None:
        rng, space = self.rng, self.space
        kind = rng.choices(("layout", "mesh", "copy", "mb", "shift", "fusion", "group"),
                           weights=(4, 3, 3, 2, 2, 1, 1))[0]
        if kind == "fusion":
            return plan.with_fusion(rng.choice([f for f in space.fusion_options
                                                if f != plan.fusion] or [plan.fusion]))
        if kind == "group":
            # the fusions need shared placements: inference on the generation placement
            # (inter-stage, RLHFuse §4), actor and critic training on one (intra-stage, §5)
            group = rng.choice(((GEN_CALL,) + INFER_CALLS, TRAIN_CALLS))
            target = plan[rng.choice(group)].placement
            size = len(target.devices)
            out = plan
            for c in group:
                if target.layout not in space.layouts[c].get(size, ()):
                    return None
                mb = self._valid_mb(c, target.layout, plan[c].micro_batches)
                if mb is None:
                    return None
                out = out.replace_call(c, CallPlan(target, mb))
            return out
        c = rng.choice(CALLS)
        cp = plan[c]
        lt, devs = cp.placement.layout, cp.placement.devices
        start, size = devs[0], len(devs)
        if kind == "layout":
            opts = [x for x in space.layouts[c].get(size, ()) if x != lt]
            if not opts:
                return None
            new_lt = rng.choice(opts)
            mb = self._valid_mb(c, new_lt, cp.micro_batches)
            return None if mb is None else plan.replace_call(c, _call(start, new_lt, mb))
        if kind == "mesh":
            sizes = [s for s in self.by_size if space.layouts[c].get(s)]
            new_size = rng.choice(sizes)
            new_start = rng.choice(self.by_size[new_size])
            new_lt = rng.choice(space.layouts[c][new_size])
            mb = self._valid_mb(c, new_lt, cp.micro_batches)
            return None if mb is None else plan.replace_call(c, _call(new_start, new_lt, mb))
        if kind == "copy":
            other = plan[rng.choice([o for o in CALLS if o != c])].placement
            if other.layout not in space.layouts[c].get(len(other.devices), ()):
                return None
            mb = self._valid_mb(c, other.layout, cp.micro_batches)
            return None if mb is None else plan.replace_call(
                c, CallPlan(other, mb))
        if kind == "mb":
            opts = [m for m in space.micro_batch_options(c, lt) if m != cp.micro_batches]
            if not opts:
                return None
            # mostly a neighbouring count (x2 or /2), sometimes any
            near = [m for m in opts if m in (cp.micro_batches * 2, cp.micro_batches // 2)]
            mb = rng.choice(near) if near and rng.random() < 0.7 else rng.choice(opts)
            return plan.replace_call(c, _call(start, lt, mb))
        # shift: same size and layout, another offset
        starts = [s for s in self.by_size.get(size, ()) if s != start]
        if not starts:
            return None
        return plan.replace_call(c, _call(rng.choice(starts), lt, cp.micro_batches))


def anneal(starts: Sequence[ExecutionPlan], space: SearchSpace, cost: CostFn, *, seed: int,
           max_steps: int | None = None, time_limit: float = 10.0, t0: float = 0.05,
           t_end: float = 1e-3, restart_after: int = 300) -> ChainResult:
    """One simulated-annealing chain from the first of ``starts`` (later ones are
    restart points). Energy differences are relative (``dE / E``); the temperature
    cools geometrically from ``t0`` to ``t_end`` over ``max_steps`` (or, without a
    step budget, over the time limit); after ``restart_after`` steps without a new
    best the chain restarts from the best, or from the next start."""
    t_begin = time.time()
    deadline = t_begin + time_limit
    rng = random.Random(seed)
    mover = _Mover(space, rng)
    cached = cost if isinstance(cost, CachedCost) else CachedCost(cost)
    cur = starts[0]
    cur_s = cached(cur)
    best, best_s = cur, cur_s
    pending = list(starts[1:])
    steps = accepted = since_best = 0
    while True:
        if max_steps is not None and steps >= max_steps:
            break
        if time.time() >= deadline:
            break
        frac = (steps / max_steps if max_steps else (time.time() - t_begin) / max(time_limit, 1e-9))
        temp = t0 * (t_end / t0) ** min(1.0, frac)
        steps += 1
        cand = mover.move(cur)
        if cand is None or cand.key() == cur.key():
            continue
        s = cached(cand)
        delta = (s.energy - cur_s.energy) / max(cur_s.energy, 1e-12)
        if delta <= 0 or rng.random() < math.exp(-delta / temp):
            cur, cur_s = cand, s
            accepted += 1
        if _better(cur_s, best_s):
            best, best_s, since_best = cur, cur_s, 0
        else:
            since_best += 1
        if since_best >= restart_after:
            cur = pending.pop(0) if pending else best
            cur_s, since_best = cached(cur), 0
    return ChainResult(best.renamed("searched"), best_s, steps, cached.evaluations, accepted,
                       time.time() - t_begin)


def _chain_worker(conn, starts, space, cost, seed, max_steps, time_limit) -> None:
    try:
        conn.send(("ok", anneal(starts, space, cost, seed=seed, max_steps=max_steps,
                                time_limit=time_limit)))
    except BaseException as e:  # report to the parent instead of dying silently
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


# ------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """The best plan found and the baselines it was compared with."""

    best: ExecutionPlan
    score: Score
    baselines: dict[str, tuple[ExecutionPlan, Score]]
    """``flattening``, ``interleaving``, ``separation`` (tuned) and ``heuristic``."""
    chains: list[ChainResult]
    seconds: float
    baseline_seconds: float

    @property
    def best_strategy(self) -> tuple[str, Score] | None:
        fits = [(n, s) for n, (_, s) in self.baselines.items() if n in STRATEGIES and s.fits]
        return min(fits, key=lambda x: x[1].time_s) if fits else None


class NoFittingPlan(ValueError):
    """No plan in the space fits memory; the message says by how much the closest misses."""


def search(space: SearchSpace, cost: CostFn, *, time_limit: float = 10.0, seed: int = 0,
           workers: int = 2, max_steps: int | None = None,
           explain: Callable[[ExecutionPlan], str] | None = None) -> SearchResult:
    """Strategies first (tuned), then ``workers`` annealing chains (processes when
    ``workers > 1``) from the best starts with seeds ``seed, seed+1, ...``; each chain
    gets ``time_limit`` seconds (and ``max_steps`` steps if given), then the best
    is polished by coordinate descent. Raises :class:`NoFittingPlan` when no
    evaluated plan fits memory (``explain(plan)`` words why the closest does not)."""
    t_begin = time.time()
    cached = cost if isinstance(cost, CachedCost) else CachedCost(cost)
    baselines: dict[str, tuple[ExecutionPlan, Score]] = {}
    for name, fn in (("flattening", flattening), ("interleaving", interleaving),
                     ("separation", separation)):
        got = fn(space, cached)
        if got is not None:
            baselines[name] = (got[0].renamed(name), got[1])
    heur = megatron_heuristic(space, cached)
    if heur is not None:
        baselines["heuristic"] = heur
    baseline_seconds = time.time() - t_begin
    if not baselines:
        raise NoFittingPlan("no plan: no layout of all devices fits every call")
    ranked = sorted((p for p, _ in baselines.values()), key=lambda p: cached(p).energy)
    chains: list[ChainResult] = []
    if workers <= 1:
        chains.append(anneal(ranked, space, cached, seed=seed, max_steps=max_steps,
                             time_limit=time_limit))
    else:
        ctx = mp.get_context("fork")
        procs = []
        for i in range(workers):
            order = ranked[i % len(ranked):] + ranked[:i % len(ranked)]
            parent, child = ctx.Pipe(duplex=False)
            pr = ctx.Process(target=_chain_worker, daemon=True,
                             args=(child, order, space, cached, seed + i, max_steps, time_limit))
            pr.start()
            child.close()
            procs.append((pr, parent))
        for pr, parent in procs:
            status, payload = parent.recv()
            pr.join()
            if status != "ok":
                raise RuntimeError(f"plan search chain failed: {payload}")
            chains.append(payload)
    best, best_s = None, None
    for p, s in [(ch.best, ch.score) for ch in chains] + list(baselines.values()):
        if _better(s, best_s):
            best, best_s = p, s
    best, best_s = tune(best.renamed("searched"), space, cached, sweeps=2,
                        deadline=time.time() + max(1.0, time_limit / 4))
    if not best_s.fits:
        detail = explain(best) if explain else f"over by {best_s.overflow_bytes / 1e9:.1f} GB"
        raise NoFittingPlan(f"no plan fits memory on {space.num_devices} devices; the closest: "
                            f"{detail}")
    return SearchResult(best.renamed("searched"), best_s, baselines, chains,
                        time.time() - t_begin, baseline_seconds)
