"""Evaluation and local search of fused pipeline schedules (RLHFuse §5).

A schedule is one task order per node (``order[node_ptr[n]:node_ptr[n+1]]`` for
node ``n``); every task ``t`` has a duration ``dur[t]``, a node ``node[t]`` and at
most one cross-stage predecessor ``dep[t]`` (its micro-batch chain; ``succ`` is the
inverse, ``-1`` for none). RLHFuse §5 evaluates a schedule by the recursion::

    start[t] = max(end[previous task on node[t]], end[dep[t]]),  end[t] = start[t] + dur[t]

and calls an order invalid when it deadlocks. :func:`_propagate` computes the
recursion in O(T) with a work-list of nodes (a node advances while the dependency
of its next task is done, and is woken when that dependency finishes); tasks it
could not reach are a deadlock.

The search moves of :func:`anneal_makespan` and :func:`anneal_memory` swap two
adjacent tasks on one node, and are evaluated *incrementally*: a swap of the tasks
at positions ``i, i+1`` whose first started at ``t0`` cannot change any task that
started before ``t0`` (durations are positive, so a task depending on the swapped
pair started after ``t0``), so only the tasks starting at ``t0`` or later are
recomputed, from a per-node frontier found by binary search; the old times are
kept in an undo log to reject the move. An acceptance threshold is drawn before
evaluating, so a move is abandoned as soon as one task ends past it.

All functions work on flat int64/float64 arrays and are compiled with numba
(``njit(cache=True)``); without numba the same code runs as plain Python/numpy
(slow, but correct).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

    def njit(*args, **kwargs):  # noqa: D103 - identity decorator
        if args and callable(args[0]):
            return args[0]
        return lambda f: f


DEADLOCK = -1.0  # returned by the evaluators for an order that deadlocks
EXCEEDED = -2.0  # returned when a task ended past the acceptance threshold


@njit(cache=True)
def seed_rng(seed):
    """Seeds the random generator the search kernels draw from."""
    np.random.seed(seed)


@njit(cache=True)
def _propagate(order, pos, node_ptr, dur, node, dep, succ, start, end, head,
               stack, in_stack, threshold, log, undo_task, undo_val, due, late):
    """Schedules every task at or after ``head[n]`` on each node ``n``.

    Tasks before ``head[n]`` are done and keep their times; a task is done iff
    ``pos[t] < head[node[t]]``. If ``due`` is not empty, ``late[0]`` is kept equal
    to the total tardiness ``sum(max(0, end - due))``. Returns
    ``(makespan, n_logged)``; makespan is
    ``DEADLOCK`` if some task could not be scheduled, ``EXCEEDED`` if a task ended
    after ``threshold`` (evaluation stopped there). With ``log`` the previous
    ``(start, end)`` of each rescheduled task is appended to the undo log.
    """
    n_nodes = node_ptr.shape[0] - 1
    remaining = 0
    sp = 0
    for n in range(n_nodes):
        remaining += node_ptr[n + 1] - head[n]
        stack[sp] = n
        sp += 1
        in_stack[n] = 1
    n_log = 0
    while sp > 0:
        sp -= 1
        n = stack[sp]
        in_stack[n] = 0
        k = head[n]
        stop = node_ptr[n + 1]
        free = end[order[k - 1]] if k > node_ptr[n] else 0.0
        while k < stop:
            t = order[k]
            d = dep[t]
            ready = 0.0
            if d >= 0:
                if pos[d] >= head[node[d]]:
                    break  # dependency not scheduled yet: wait to be woken
                ready = end[d]
            s = free if free > ready else ready
            e = s + dur[t]
            if log:
                undo_task[n_log] = t
                undo_val[2 * n_log] = start[t]
                undo_val[2 * n_log + 1] = end[t]
                n_log += 1
            if due.shape[0] > 0:
                late[0] += max(0.0, e - due[t]) - max(0.0, end[t] - due[t])
            start[t] = s
            end[t] = e
            free = e
            k += 1
            head[n] = k
            remaining -= 1
            if e > threshold:
                return EXCEEDED, n_log
            u = succ[t]
            if u >= 0:
                nu = node[u]
                if nu != n and in_stack[nu] == 0 and head[nu] < node_ptr[nu + 1] and order[head[nu]] == u:
                    stack[sp] = nu
                    sp += 1
                    in_stack[nu] = 1
    if remaining > 0:
        return DEADLOCK, n_log
    mk = 0.0
    for n in range(n_nodes):
        if node_ptr[n + 1] > node_ptr[n]:
            e = end[order[node_ptr[n + 1] - 1]]
            if e > mk:
                mk = e
    return mk, n_log


@njit(cache=True)
def evaluate(order, pos, node_ptr, dur, node, dep, succ, start, end):
    """Full evaluation: fills ``start``/``end``; returns the makespan or ``DEADLOCK``."""
    n_nodes = node_ptr.shape[0] - 1
    head = node_ptr[:-1].copy()
    stack = np.empty(n_nodes, np.int64)
    in_stack = np.zeros(n_nodes, np.uint8)
    dummy_i = np.empty(0, np.int64)
    dummy_f = np.empty(0, np.float64)
    mk, _ = _propagate(order, pos, node_ptr, dur, node, dep, succ, start, end, head,
                       stack, in_stack, np.inf, False, dummy_i, dummy_f, dummy_f, dummy_f)
    return mk


@njit(cache=True)
def node_peaks(order, node_ptr, memd, prefix, peaks):
    """Per-node peak activation memory of the orders (``prefix`` = running sums).

    A forward adds its ``mem`` and a backward releases it; a node's peak is the
    highest running sum over its order. Returns the highest peak over nodes.
    """
    best = 0.0
    for n in range(node_ptr.shape[0] - 1):
        acc = 0.0
        pk = 0.0
        for k in range(node_ptr[n], node_ptr[n + 1]):
            acc += memd[order[k]]
            prefix[k] = acc
            if acc > pk:
                pk = acc
        peaks[n] = pk
        if pk > best:
            best = pk
    return best


@njit(cache=True)
def _set_frontier(order, node_ptr, start, t0, head, swap_node, swap_pos):
    """``head[n]`` = first position on node ``n`` whose task starts at ``t0`` or later.

    On ``swap_node`` the orders were just changed at ``swap_pos``; it restarts there.
    """
    for n in range(node_ptr.shape[0] - 1):
        if n == swap_node:
            head[n] = swap_pos
            continue
        lo = node_ptr[n]
        hi = node_ptr[n + 1]
        while lo < hi:  # starts increase along a node's order
            mid = (lo + hi) // 2
            if start[order[mid]] < t0:
                lo = mid + 1
            else:
                hi = mid
        head[n] = lo


@njit(cache=True)
def _swap(order, pos, i):
    a = order[i]
    b = order[i + 1]
    order[i] = b
    order[i + 1] = a
    pos[b] = i
    pos[a] = i + 1


@njit(cache=True)
def _undo(start, end, undo_task, undo_val, n_log):
    for j in range(n_log):
        t = undo_task[j]
        start[t] = undo_val[2 * j]
        end[t] = undo_val[2 * j + 1]


@njit(cache=True)
def swap_and_time(order, pos, node_ptr, dur, node, dep, succ, start, end, i, threshold,
                  head, stack, in_stack, undo_task, undo_val, due, late):
    """Swaps the tasks at positions ``i`` and ``i+1`` (same node) and re-times them.

    Returns ``(makespan, n_logged)``; the makespan is ``DEADLOCK`` or ``EXCEEDED``
    (past ``threshold``) when the move is invalid, and the caller must then (or
    to reject it) call :func:`unswap`. ``due``/``late``: see :func:`_propagate`.
    """
    a = order[i]
    t0 = start[a]
    _swap(order, pos, i)
    _set_frontier(order, node_ptr, start, t0, head, node[a], i)
    return _propagate(order, pos, node_ptr, dur, node, dep, succ, start, end, head,
                      stack, in_stack, threshold, True, undo_task, undo_val, due, late)


@njit(cache=True)
def unswap(order, pos, start, end, i, undo_task, undo_val, n_log):
    """Reverts :func:`swap_and_time` (the caller restores its tardiness)."""
    _undo(start, end, undo_task, undo_val, n_log)
    _swap(order, pos, i)


@njit(cache=True)
def critical_arcs(order, pos, node_ptr, node, dep, klass, start, end, eps, arcs):
    """Positions ``i`` whose tasks ``order[i], order[i+1]`` form a critical node arc.

    Walks back one longest path from a task that ends at the makespan, picking at
    random where two predecessors are tight. Swapping the two tasks of a critical
    arc never creates a cycle (van Laarhoven, Aarts & Lenstra 1992: another path
    between them would make the second start later), and only such swaps can
    shorten this path. Arcs between two tasks of one class (``klass``) are left
    out: with first-in-first-out micro-batches such a swap changes nothing.
    Returns the number of arcs written to ``arcs``.
    """
    mk = 0.0
    for n in range(node_ptr.shape[0] - 1):
        if node_ptr[n + 1] > node_ptr[n]:
            e = end[order[node_ptr[n + 1] - 1]]
            if e > mk:
                mk = e
    n_tied = 0
    t = -1
    for n in range(node_ptr.shape[0] - 1):
        if node_ptr[n + 1] > node_ptr[n]:
            last = order[node_ptr[n + 1] - 1]
            if end[last] >= mk - eps:
                n_tied += 1
                if np.random.randint(0, n_tied) == 0:  # uniform among ties
                    t = last
    na = 0
    while t >= 0:
        s = start[t]
        if s <= eps:
            break
        k = pos[t]
        prev_tight = k > node_ptr[node[t]] and end[order[k - 1]] >= s - eps
        d = dep[t]
        dep_tight = d >= 0 and end[d] >= s - eps
        if prev_tight and dep_tight:
            if np.random.random() < 0.5:
                dep_tight = False
            else:
                prev_tight = False
        if prev_tight:
            u = order[k - 1]
            if klass[u] != klass[t]:
                arcs[na] = k - 1
                na += 1
            t = u
        elif dep_tight:
            t = d
        else:
            break
    return na


@njit(cache=True)
def tardiness(end, due):
    """``sum(max(0, end - due))``: how far the tasks end past their due dates."""
    tot = 0.0
    for t in range(end.shape[0]):
        if end[t] > due[t]:
            tot += end[t] - due[t]
    return tot


@njit(cache=True)
def anneal_makespan(order, pos, node_ptr, dur, node, dep, succ, memd, klass, start, end, prefix,
                    best_order, due, state, n_iters, cooling, w_makespan, w_late, cap, target, eps):
    """Simulated annealing on the makespan over critical adjacent swaps (RLHFuse §5).

    Energy: ``w_makespan * makespan + w_late * tardiness(end, due)``. With due
    dates ``due[t] = target - tail[t]`` the tardiness is zero exactly when the
    makespan meets ``target``, and unlike the makespan it counts every late task,
    so moves that help some of several critical paths are rewarded.

    ``state`` = ``[energy, best makespan, temperature, iterations, makespan,
    tardiness]`` (float64[6]) is read and updated, so the search runs in chunks;
    ``start``/``end`` must hold the times of ``order`` and ``prefix`` its running
    memory sums (:func:`node_peaks`). Each iteration swaps the two tasks of a
    random critical node arc, rejects it if the node's memory would pass ``cap``,
    and accepts by the Metropolis rule; the temperature is multiplied by
    ``cooling``. ``best_order`` receives the order of the best makespan. Stops once
    the best makespan is within ``eps`` of ``target`` (the lower bound).
    """
    n_nodes = node_ptr.shape[0] - 1
    T = order.shape[0]
    head = np.empty(n_nodes, np.int64)
    stack = np.empty(n_nodes, np.int64)
    in_stack = np.zeros(n_nodes, np.uint8)
    undo_task = np.empty(T, np.int64)
    undo_val = np.empty(2 * T, np.float64)
    arcs = np.empty(T, np.int64)
    late = np.zeros(1)
    no_due = np.empty(0, np.float64)
    use_late = w_late > 0.0
    cur = state[0]
    best = state[1]
    temp = state[2]
    mk_cur = state[4]
    late[0] = state[5]
    done = 0
    while done < n_iters and best > target + eps:
        done += 1
        na = critical_arcs(order, pos, node_ptr, node, dep, klass, start, end, eps, arcs)
        temp *= cooling
        if na == 0:
            break  # the makespan is one chain: nothing can shorten it
        i = arcs[np.random.randint(0, na)]
        a = order[i]
        b = order[i + 1]
        n = node[a]
        new_prefix = (prefix[i - 1] if i > node_ptr[n] else 0.0) + memd[b]
        if new_prefix > cap + eps:
            continue
        slack = eps
        if temp > 0.0:
            slack -= temp * math.log(1.0 - np.random.random())
        late_before = late[0]
        if use_late:
            mk, n_log = swap_and_time(order, pos, node_ptr, dur, node, dep, succ, start, end, i, np.inf,
                                      head, stack, in_stack, undo_task, undo_val, due, late)
            energy = w_makespan * mk + w_late * late[0]
            if mk < 0.0 or energy > cur + slack:  # invalid, or rejected by the Metropolis rule
                unswap(order, pos, start, end, i, undo_task, undo_val, n_log)
                late[0] = late_before
                continue
        else:
            mk, n_log = swap_and_time(order, pos, node_ptr, dur, node, dep, succ, start, end, i,
                                      (cur + slack) / w_makespan, head, stack, in_stack, undo_task,
                                      undo_val, no_due, late)
            if mk < 0.0:
                unswap(order, pos, start, end, i, undo_task, undo_val, n_log)
                continue
            energy = w_makespan * mk
        cur = energy
        mk_cur = mk
        prefix[i] = new_prefix
        if mk < best - eps:
            best = mk
            best_order[:] = order
    state[0] = cur
    state[1] = best
    state[2] = temp
    state[3] += done
    state[4] = mk_cur
    state[5] = late[0]


@njit(cache=True)
def _memory_energy(peaks, alpha):
    mx = 0.0
    tot = 0.0
    for n in range(peaks.shape[0]):
        tot += peaks[n]
        if peaks[n] > mx:
            mx = peaks[n]
    return mx + alpha * tot / peaks.shape[0]


@njit(cache=True)
def anneal_memory(order, pos, node_ptr, dur, node, dep, succ, memd, start, end, prefix,
                  peaks, best_order, state, n_iters, cooling, mk_limit, alpha, eps):
    """Simulated annealing on peak memory that never loses makespan (RLHFuse §5).

    Energy: highest node peak + ``alpha`` * mean node peak (the mean gives the
    search a gradient while several nodes share the highest peak). A move swaps a
    random pair of adjacent tasks on one node that changes its running memory sum;
    the memory change is O(tasks on the node) and is judged first, then the
    incremental timing check rejects it if the makespan would exceed ``mk_limit``
    or the order deadlocks. ``state`` = ``[energy, best energy, temperature,
    iterations, best peak]``; ``prefix``/``peaks`` must match ``order`` (see
    :func:`node_peaks`).
    """
    n_nodes = node_ptr.shape[0] - 1
    T = order.shape[0]
    head = np.empty(n_nodes, np.int64)
    stack = np.empty(n_nodes, np.int64)
    in_stack = np.zeros(n_nodes, np.uint8)
    undo_task = np.empty(T, np.int64)
    undo_val = np.empty(2 * T, np.float64)
    no_due = np.empty(0, np.float64)
    late = np.zeros(1)
    cur = state[0]
    best = state[1]
    temp = state[2]
    best_peak = state[4]
    for _ in range(n_iters):
        temp *= cooling
        k = np.random.randint(0, T)
        n = node[order[k]]
        if k + 1 >= node_ptr[n + 1]:
            continue
        a = order[k]
        b = order[k + 1]
        if memd[a] == memd[b]:
            continue  # the running sum would not change
        base = prefix[k - 1] if k > node_ptr[n] else 0.0
        new_prefix = base + memd[b]
        pk = new_prefix
        for j in range(node_ptr[n], node_ptr[n + 1]):
            if j != k and prefix[j] > pk:
                pk = prefix[j]
        old_pk = peaks[n]
        peaks[n] = pk
        energy = _memory_energy(peaks, alpha)
        delta = energy - cur
        if delta > eps and (temp <= 0.0 or np.random.random() >= math.exp(-delta / temp)):
            peaks[n] = old_pk
            continue
        mk, n_log = swap_and_time(order, pos, node_ptr, dur, node, dep, succ, start, end, k,
                                  mk_limit + eps, head, stack, in_stack, undo_task, undo_val, no_due, late)
        if mk < 0.0:
            unswap(order, pos, start, end, k, undo_task, undo_val, n_log)
            peaks[n] = old_pk
            continue
        prefix[k] = new_prefix
        cur = energy
        peak = 0.0
        for m in range(n_nodes):
            if peaks[m] > peak:
                peak = peaks[m]
        if peak < best_peak - eps or (peak <= best_peak + eps and energy < best - eps):
            best = energy
            best_peak = peak
            best_order[:] = order
    state[0] = cur
    state[1] = best
    state[2] = temp
    state[3] += n_iters
    state[4] = best_peak


@njit(cache=True)
def list_schedule(dur, node, succ, class_first, class_stride, class_count, class_node,
                  class_pair, class_cap, node_class_ptr, node_classes, key_major, key_minor):
    """Non-delay list scheduling over first-in-first-out task classes.

    Tasks of one class (``class_first[c] + k * class_stride[c]`` for ``k <
    class_count[c]``, all on ``class_node[c]``) are released in order, so each
    class offers one candidate: its oldest released task. The node that can start
    a task earliest goes next (ties to the lower node id); it runs, among its
    candidates ready by then, the one with the lowest ``(key_major, release time,
    key_minor)``. A forward class ``c`` (``class_pair[c] >= 0`` names the backward
    class of its stage) admits a task only while fewer than ``class_cap[c]`` of its
    micro-batches are outstanding. Returns ``(order, node_ptr)``; ``order`` is
    empty if the admission caps deadlock.
    """
    T = dur.shape[0]
    C = class_first.shape[0]
    n_nodes = node_class_ptr.shape[0] - 1
    released = np.zeros(C, np.int64)  # tasks of the class whose dependency finished
    taken = np.zeros(C, np.int64)  # tasks of the class scheduled
    release_time = np.zeros(T)
    node_free = np.zeros(n_nodes)
    cls_of = np.empty(T, np.int64)
    for c in range(C):
        for k in range(class_count[c]):
            cls_of[class_first[c] + k * class_stride[c]] = c
    # Tasks with no dependency: the first class of each chain, released at time 0.
    is_dep_target = np.zeros(T, np.uint8)
    for t in range(T):
        if succ[t] >= 0:
            is_dep_target[succ[t]] = 1
    for c in range(C):
        if is_dep_target[class_first[c]] == 0:
            released[c] = class_count[c]
    counts = np.zeros(n_nodes + 1, np.int64)
    for t in range(T):
        counts[node[t] + 1] += 1
    node_ptr = np.cumsum(counts)
    fill = node_ptr[:-1].copy()
    order = np.empty(T, np.int64)
    for _ in range(T):
        best_start = np.inf
        best_node = -1
        for n in range(n_nodes):
            earliest = np.inf
            for j in range(node_class_ptr[n], node_class_ptr[n + 1]):
                c = node_classes[j]
                if taken[c] >= released[c]:
                    continue
                if class_pair[c] >= 0 and taken[c] - taken[class_pair[c]] >= class_cap[c]:
                    continue
                r = release_time[class_first[c] + taken[c] * class_stride[c]]
                if r < earliest:
                    earliest = r
            if earliest < np.inf:
                s = earliest if earliest > node_free[n] else node_free[n]
                if s < best_start:
                    best_start = s
                    best_node = n
        if best_node < 0:
            return np.empty(0, np.int64), node_ptr
        n = best_node
        pick = -1
        for j in range(node_class_ptr[n], node_class_ptr[n + 1]):
            c = node_classes[j]
            if taken[c] >= released[c]:
                continue
            if class_pair[c] >= 0 and taken[c] - taken[class_pair[c]] >= class_cap[c]:
                continue
            t = class_first[c] + taken[c] * class_stride[c]
            if release_time[t] > best_start:
                continue
            if pick < 0:
                pick = t
                continue
            if key_major[t] < key_major[pick] or (key_major[t] == key_major[pick] and (
                    release_time[t] < release_time[pick] or (release_time[t] == release_time[pick]
                                                             and key_minor[t] < key_minor[pick]))):
                pick = t
        c = cls_of[pick]
        taken[c] += 1
        order[fill[n]] = pick
        fill[n] += 1
        node_free[n] = best_start + dur[pick]
        u = succ[pick]
        if u >= 0:
            release_time[u] = node_free[n]
            released[cls_of[u]] += 1
    return order, node_ptr
