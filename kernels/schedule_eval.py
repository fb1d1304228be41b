"""Evaluation and local search of fused pipeline schedules (RLHFuse §5).

A schedule is one task order per node (``order[node_ptr[n]:node_ptr[n+1]]`` for
node ``n``; ``pos`` is the inverse permutation); every task ``t`` has a duration
``dur[t]``, a node ``node[t]`` and at most one cross-stage predecessor ``dep[t]``
(its micro-batch chain; ``succ`` is the inverse, ``-1`` for none). RLHFuse §5
evaluates a schedule by the recursion::

    start[t] = max(end[previous task on node[t]], end[dep[t]]),  end[t] = start[t] + dur[t]

and calls an order invalid when it deadlocks. :func:`_propagate` computes the
recursion in O(T) with a work-list of nodes (a node advances while the dependency
of its next task is done, and is woken when that dependency finishes); tasks it
could not reach are a deadlock.

Moves rearrange a segment ``[lo, hi]`` of one node's order and are evaluated
*incrementally*: no task that started before the segment's first task (at
``t0``) can change -- durations are positive, so anything depending on the
segment starts after ``t0`` -- so only tasks starting at ``t0`` or later are
re-timed, from a per-node frontier found by binary search. The old times go to an
undo log, the old segment to a buffer, so a rejected move is reverted at the
cost of what it touched. The acceptance threshold is drawn before evaluating, so a
move is abandoned as soon as one task ends past it.

Memory is a running sum per node (``prefix``): a forward adds its ``memd > 0``,
a backward releases it; a node's peak is the highest running sum.

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
               stack, in_stack, threshold, log, undo_task, undo_val):
    """Schedules every task at or after ``head[n]`` on each node ``n``.

    Tasks before ``head[n]`` are done and keep their times; a task is done iff
    ``pos[t] < head[node[t]]``. Returns ``(makespan, n_logged)``; makespan is ``DEADLOCK`` if some task could not be
    scheduled, ``EXCEEDED`` if a task ended after ``threshold`` (evaluation
    stopped there). With ``log`` the previous ``(start, end)`` of each rescheduled
    task is appended to the undo log.
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
                       stack, in_stack, np.inf, False, dummy_i, dummy_f)
    return mk


@njit(cache=True)
def node_peaks(order, node_ptr, memd, prefix, peaks):
    """Per-node peak activation memory of the orders (``prefix`` = running sums).

    Returns the highest peak over nodes.
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
def _workspace(num_tasks, num_nodes):
    # head, stack, in_stack, undo_task, undo_val, saved segment
    return (np.empty(num_nodes, np.int64), np.empty(num_nodes, np.int64),
            np.zeros(num_nodes, np.uint8), np.empty(num_tasks, np.int64),
            np.empty(2 * num_tasks, np.float64), np.empty(num_tasks, np.int64))


@njit(cache=True)
def _save(order, lo, hi, ws):
    saved = ws[5]
    for k in range(lo, hi + 1):
        saved[k - lo] = order[k]


@njit(cache=True)
def _retime(order, pos, node_ptr, dur, node, dep, succ, start, end, lo, hi, threshold, ws):
    """Re-times after the segment ``[lo, hi]`` of one node was rearranged.

    The segment's previous contents must be in the workspace (:func:`_save`);
    fixes ``pos`` for the segment. Returns ``(makespan, n_logged)`` as
    :func:`_propagate`; the caller reverts a rejected move with :func:`_revert`.
    """
    head = ws[0]
    saved = ws[5]
    for k in range(lo, hi + 1):
        pos[order[k]] = k
    t0 = start[saved[0]]  # the segment's first task started first
    n_seg = node[order[lo]]
    for n in range(node_ptr.shape[0] - 1):
        if n == n_seg:
            head[n] = lo
            continue
        a = node_ptr[n]
        b = node_ptr[n + 1]
        while a < b:  # starts increase along a node's order
            mid = (a + b) // 2
            if start[order[mid]] < t0:
                a = mid + 1
            else:
                b = mid
        head[n] = a
    return _propagate(order, pos, node_ptr, dur, node, dep, succ, start, end, head,
                      ws[1], ws[2], threshold, True, ws[3], ws[4])


@njit(cache=True)
def _revert(order, pos, start, end, lo, hi, n_log, ws):
    """Undoes :func:`_retime`: old segment back, old times back."""
    saved = ws[5]
    for k in range(lo, hi + 1):
        order[k] = saved[k - lo]
        pos[order[k]] = k
    undo_task = ws[3]
    undo_val = ws[4]
    for j in range(n_log):
        t = undo_task[j]
        start[t] = undo_val[2 * j]
        end[t] = undo_val[2 * j + 1]


@njit(cache=True)
def try_swap(order, pos, node_ptr, dur, node, dep, succ, start, end, i, threshold, ws):
    """Swaps positions ``i``/``i+1`` and keeps it if valid and within ``threshold``.

    Returns the new makespan, or ``DEADLOCK``/``EXCEEDED`` (then nothing changed).
    """
    _save(order, i, i + 1, ws)
    order[i] = ws[5][1]
    order[i + 1] = ws[5][0]
    mk, n_log = _retime(order, pos, node_ptr, dur, node, dep, succ, start, end, i, i + 1, threshold, ws)
    if mk < 0.0:
        _revert(order, pos, start, end, i, i + 1, n_log, ws)
    return mk


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
def _critical_move(order, node_ptr, node, memd, prefix, i, cap, eps, ws):
    """Builds the move that puts ``order[i+1]`` before ``order[i]`` within ``cap``.

    Plain swap when memory allows. Otherwise the task moving up is a forward that
    would lift the node's running memory past ``cap`` at position ``i``; then one
    of the nearest earlier forwards on the node that holds enough memory is moved
    to just after the pair (van Laarhoven's critical swap plus the one move that
    makes room for it -- the memory cap is a constraint the critical path does
    not show). Saves the segment and writes the new one in place; returns its
    ``(lo, hi)``, or ``(-1, -1)`` if no such forward exists.
    """
    n = node[order[i]]
    a = order[i]
    b = order[i + 1]
    base = prefix[i - 1] if i > node_ptr[n] else 0.0
    need = base + memd[b] - cap
    if need <= eps:
        _save(order, i, i + 1, ws)
        order[i] = b
        order[i + 1] = a
        return i, i + 1
    j = -1
    for k in range(i - 1, node_ptr[n] - 1, -1):
        if memd[order[k]] >= need - eps:
            j = k
            if np.random.random() < 0.5:
                break
    if j < 0:
        return -1, -1
    _save(order, j, i + 1, ws)
    f = order[j]
    for k in range(j, i - 1):
        order[k] = order[k + 1]
    order[i - 1] = b
    order[i] = a
    order[i + 1] = f
    return j, i + 1


@njit(cache=True)
def _random_block_move(order, node_ptr, node, klass, ws):
    """Moves a random block of 1-3 adjacent tasks a few places along its node.

    A block move (an insertion when the block is one task) can carry a forward
    together with its backward past other work without the memory peak in
    between that two single swaps would need. Saves the affected segment and
    writes the new one in place; returns its ``(lo, hi)``, or ``(-1, -1)``.
    """
    T = order.shape[0]
    j = np.random.randint(0, T)
    n = node[order[j]]
    first = node_ptr[n]
    stop = node_ptr[n + 1]
    length = 1 + np.random.randint(0, 3)
    if j + length > stop:
        return -1, -1
    shift = 1 + np.random.randint(0, 2 * length + 2)
    if np.random.random() < 0.5:
        shift = -shift
    k = j + shift  # new first position of the block
    if k < first or k + length > stop:
        return -1, -1
    lo = j if j < k else k
    hi = (k + length - 1) if j < k else (j + length - 1)
    if length == 1 and klass[order[lo]] == klass[order[hi]] and hi == lo + 1:
        return -1, -1  # swapping two tasks of one class changes nothing
    _save(order, lo, hi, ws)
    saved = ws[5]
    w = lo
    if k < j:  # block first, then what it jumped over
        for q in range(length):
            order[w] = saved[j - lo + q]
            w += 1
        for q in range(k, j):
            order[w] = saved[q - lo]
            w += 1
    else:  # what it jumped over, then the block
        for q in range(j + length, k + length):
            order[w] = saved[q - lo]
            w += 1
        for q in range(length):
            order[w] = saved[j - lo + q]
            w += 1
    return lo, hi


@njit(cache=True)
def _segment_fits(order, node_ptr, node, memd, prefix, lo, hi, cap, eps):
    """Whether the running memory over the (rearranged) segment stays within ``cap``."""
    acc = prefix[lo - 1] if lo > node_ptr[node[order[lo]]] else 0.0
    for k in range(lo, hi + 1):
        acc += memd[order[k]]
        if acc > cap + eps:
            return False
    return True


@njit(cache=True)
def _refresh_prefix(order, node_ptr, node, memd, prefix, lo, hi):
    acc = prefix[lo - 1] if lo > node_ptr[node[order[lo]]] else 0.0
    for k in range(lo, hi + 1):
        acc += memd[order[k]]
        prefix[k] = acc


@njit(cache=True)
def _store_state(state, cur, best, temp, done):
    """Writes back the makespan annealers' ``[makespan, best, temperature, iterations]``."""
    state[0] = cur
    state[1] = best
    state[2] = temp
    state[3] += done


@njit(cache=True)
def _metropolis_threshold(cur, temp, eps):
    """The highest makespan a move may reach and be accepted: the Metropolis rule with
    its random draw made before the evaluation, so the evaluation can stop past it."""
    if temp > 0.0:
        return cur + eps - temp * math.log(1.0 - np.random.random())
    return cur + eps


@njit(cache=True)
def anneal_makespan(order, pos, node_ptr, dur, node, dep, succ, memd, klass, start, end, prefix,
                    best_order, state, n_iters, cooling, cap, target, eps, p_random):
    """Simulated annealing on the makespan over critical moves (RLHFuse §5).

    ``state`` = ``[makespan, best makespan, temperature, iterations]`` (float64[4])
    is read and updated, so the search runs in chunks; ``start``/``end`` must hold
    the times of ``order`` and ``prefix`` its running memory sums
    (:func:`node_peaks`), within ``cap``. Each iteration makes the critical move
    (:func:`_critical_move`) of a random critical arc -- or, with probability
    ``p_random`` and whenever the memory cap blocks the critical move, a random
    block move (:func:`_random_block_move`), which keeps the search connected
    (``p_random = 0`` disables both) -- and accepts it by the Metropolis rule, drawn before evaluating so that a move is abandoned as soon
    as a task ends past the acceptable makespan; the temperature is multiplied by
    ``cooling``. ``best_order`` receives the best order seen. Stops once the best
    makespan is within ``eps`` of ``target`` (a lower bound).
    """
    T = order.shape[0]
    ws = _workspace(T, node_ptr.shape[0] - 1)
    arcs = np.empty(T, np.int64)
    cur = state[0]
    best = state[1]
    temp = state[2]
    done = 0
    na = -1  # critical arcs in ``arcs``; -1: not computed for the current order
    uses = 0
    while done < n_iters and best > target + eps:
        done += 1
        temp *= cooling
        critical = not (p_random > 0.0 and np.random.random() < p_random)
        if critical and (na < 0 or uses >= 8):
            # A critical path serves until a move is accepted or it served 8 moves
            # (ties between paths are broken at random, so a fresh one may differ).
            na = critical_arcs(order, pos, node_ptr, node, dep, klass, start, end, eps, arcs)
            uses = 0
            if na == 0 and p_random <= 0.0:
                break  # the makespan is one chain: no critical move can shorten it
        lo = -1
        if critical and na > 0:
            uses += 1
            i = arcs[np.random.randint(0, na)]
            lo, hi = _critical_move(order, node_ptr, node, memd, prefix, i, cap, eps, ws)
            if lo >= 0 and not _segment_fits(order, node_ptr, node, memd, prefix, lo, hi, cap, eps):
                _revert(order, pos, start, end, lo, hi, 0, ws)
                lo = -1
            if lo < 0 and p_random <= 0.0:
                continue
        if lo < 0:  # chosen at random, or the memory cap left no critical move here
            lo, hi = _random_block_move(order, node_ptr, node, klass, ws)
            if lo < 0:
                continue
            if not _segment_fits(order, node_ptr, node, memd, prefix, lo, hi, cap, eps):
                _revert(order, pos, start, end, lo, hi, 0, ws)
                continue
        threshold = _metropolis_threshold(cur, temp, eps)
        mk, n_log = _retime(order, pos, node_ptr, dur, node, dep, succ, start, end, lo, hi, threshold, ws)
        if mk < 0.0:  # deadlock, or rejected by the Metropolis rule
            _revert(order, pos, start, end, lo, hi, n_log, ws)
            continue
        _refresh_prefix(order, node_ptr, node, memd, prefix, lo, hi)
        na = -1
        cur = mk
        if mk < best - eps:
            best = mk
            best_order[:] = order
    _store_state(state, cur, best, temp, done)


@njit(cache=True)
def anneal_adjacent_swaps(order, pos, node_ptr, dur, node, dep, succ, start, end, best_order, state, n_iters,
                          cooling, target, eps):
    """RLHFuse §5's published makespan annealing, the quality benchmark's reference:
    swap a random pair of adjacent tasks on one node, accept by the Metropolis rule on
    the makespan, cool geometrically. ``state`` as :func:`anneal_makespan`'s
    (``[makespan, best makespan, temperature, iterations]``); stops at ``target``."""
    T = order.shape[0]
    ws = _workspace(T, node_ptr.shape[0] - 1)
    cur = state[0]
    best = state[1]
    temp = state[2]
    done = 0
    while done < n_iters and best > target + eps and T > 1:
        done += 1
        temp *= cooling
        i = np.random.randint(0, T - 1)
        if node[order[i]] != node[order[i + 1]]:
            continue
        threshold = _metropolis_threshold(cur, temp, eps)
        mk = try_swap(order, pos, node_ptr, dur, node, dep, succ, start, end, i, threshold, ws)
        if mk < 0.0:
            continue
        cur = mk
        if mk < best - eps:
            best = mk
            best_order[:] = order
    _store_state(state, cur, best, temp, done)


@njit(cache=True)
def memory_energy(peaks, alpha):
    """Highest node peak + ``alpha`` * mean node peak."""
    mx = 0.0
    tot = 0.0
    for n in range(peaks.shape[0]):
        tot += peaks[n]
        if peaks[n] > mx:
            mx = peaks[n]
    return mx + alpha * tot / peaks.shape[0]


@njit(cache=True)
def _admissible(c, n, taken, released, class_pair, class_cap, class_mem, node_mem, node_cap):
    """Whether class ``c`` has a released task that node ``n`` may start now: a forward
    class (``class_pair[c] >= 0``) also needs room under its outstanding-micro-batch
    cap and the node's memory cap."""
    if taken[c] >= released[c]:
        return False
    return class_pair[c] < 0 or (taken[c] - taken[class_pair[c]] < class_cap[c]
                                 and node_mem[n] + class_mem[c] <= node_cap[n])


@njit(cache=True)
def list_schedule(dur, node, succ, class_first, class_stride, class_count, class_node,
                  class_pair, class_cap, class_mem, node_cap, node_class_ptr, node_classes,
                  key_major, key_minor):
    """Non-delay list scheduling over first-in-first-out task classes.

    Tasks of one class (``class_first[c] + k * class_stride[c]`` for ``k <
    class_count[c]``, all on ``class_node[c]``) are released in order, so each
    class offers one candidate: its oldest released task. The node that can start
    a task earliest goes next (ties to the lower node id); it runs, among its
    candidates ready by then, the one with the lowest ``(key_major, release time,
    key_minor)``. A forward class ``c`` (``class_pair[c] >= 0`` names the backward
    class of its stage) admits a task only while fewer than ``class_cap[c]`` of its
    micro-batches are outstanding, and only while its node's memory (``class_mem``
    per outstanding task) stays within ``node_cap``. Returns ``(order,
    node_ptr)``; ``order`` is empty if the admission caps deadlock.
    """
    T = dur.shape[0]
    C = class_first.shape[0]
    n_nodes = node_class_ptr.shape[0] - 1
    released = np.zeros(C, np.int64)  # tasks of the class whose dependency finished
    taken = np.zeros(C, np.int64)  # tasks of the class scheduled
    release_time = np.zeros(T)
    node_free = np.zeros(n_nodes)
    node_mem = np.zeros(n_nodes)
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
        best_key = np.inf  # earliest start of any candidate
        best_node = -1
        for n in range(n_nodes):
            for j in range(node_class_ptr[n], node_class_ptr[n + 1]):
                c = node_classes[j]
                if not _admissible(c, n, taken, released, class_pair, class_cap, class_mem,
                                   node_mem, node_cap):
                    continue
                t = class_first[c] + taken[c] * class_stride[c]
                s = release_time[t] if release_time[t] > node_free[n] else node_free[n]
                if s < best_key:
                    best_key = s
                    best_node = n
        if best_node < 0:
            return np.empty(0, np.int64), node_ptr
        n = best_node
        pick = -1  # among the candidates ready by then
        for j in range(node_class_ptr[n], node_class_ptr[n + 1]):
            c = node_classes[j]
            if not _admissible(c, n, taken, released, class_pair, class_cap, class_mem,
                               node_mem, node_cap):
                continue
            t = class_first[c] + taken[c] * class_stride[c]
            if release_time[t] > best_key:
                continue
            if pick < 0:
                pick = t
                continue
            if key_major[t] < key_major[pick] or (key_major[t] == key_major[pick] and (
                    release_time[t] < release_time[pick] or (release_time[t] == release_time[pick]
                                                             and key_minor[t] < key_minor[pick]))):
                pick = t
        begin = release_time[pick] if release_time[pick] > node_free[n] else node_free[n]
        c = cls_of[pick]
        taken[c] += 1
        node_mem[n] += class_mem[c]
        order[fill[n]] = pick
        fill[n] += 1
        node_free[n] = begin + dur[pick]
        u = succ[pick]
        if u >= 0:
            release_time[u] = node_free[n]
            released[cls_of[u]] += 1
    return order, node_ptr


@njit(cache=True)
def _insert(order, j, k, ws):
    """Moves ``order[j]`` to position ``k`` of the same node, shifting what lies between
    (saves the segment first); returns its ``(lo, hi)``."""
    lo = j if j < k else k
    hi = k if j < k else j
    _save(order, lo, hi, ws)
    t = order[j]
    if j < k:
        for q in range(j, k):
            order[q] = order[q + 1]
    else:
        for q in range(j, k, -1):
            order[q] = order[q - 1]
    order[k] = t
    return lo, hi


@njit(cache=True)
def _peak_move(order, node_ptr, node, memd, prefix, peaks, eps, ws):
    """A move aimed at the highest node peak: one of the forwards at or before a peak
    position ``k`` goes to just after the first backward after ``k``, or one of the
    backwards after ``k`` goes to just before it; either lowers the running sum at
    ``k`` by the moved task's memory (the move may still be rejected for the makespan).
    Returns the changed segment ``(lo, hi)`` (saved), or ``(-1, -1)``."""
    n_nodes = node_ptr.shape[0] - 1
    top = 0.0
    for n in range(n_nodes):
        if peaks[n] > top:
            top = peaks[n]
    n_tied = 0
    n = -1
    for m in range(n_nodes):
        if peaks[m] >= top - eps:
            n_tied += 1
            if np.random.randint(0, n_tied) == 0:
                n = m
    if n < 0 or node_ptr[n + 1] <= node_ptr[n]:
        return -1, -1
    first = node_ptr[n]
    stop = node_ptr[n + 1]
    n_tied = 0
    k = -1
    for q in range(first, stop):
        if prefix[q] >= top - eps:
            n_tied += 1
            if np.random.randint(0, n_tied) == 0:
                k = q
    if k < 0:
        return -1, -1
    if np.random.random() < 0.5:
        # a forward at or before k, moved to just after the first backward after k (the
        # running sum after that backward is below the peak; moving the forward past
        # its own backward would deadlock and be rejected)
        kb = k + 1
        while kb < stop and memd[order[kb]] >= 0.0:
            kb += 1
        if kb >= stop:
            return -1, -1
        span = k - first + 1
        for _ in range(8):
            j = k - np.random.randint(0, min(span, 64))
            if memd[order[j]] > 0.0:
                return _insert(order, j, kb, ws)
    else:
        span = stop - k - 1
        if span <= 0:
            return -1, -1
        for _ in range(8):
            j = k + 1 + np.random.randint(0, min(span, 64))
            if memd[order[j]] < 0.0:
                return _insert(order, j, k, ws)
    return -1, -1


@njit(cache=True)
def anneal_memory_moves(order, pos, node_ptr, dur, node, dep, succ, memd, klass, start, end, prefix,
                        peaks, best_order, state, n_iters, cooling, mk_limit, alpha, eps, p_peak):
    """Simulated annealing on peak memory that never loses makespan (RLHFuse §5's
    second phase), over insertion moves.

    Energy: highest node peak + ``alpha`` * mean node peak (:func:`memory_energy`; the
    mean gives the search a gradient while several nodes share the highest peak).
    With probability ``p_peak`` a move aimed at the highest peak (:func:`_peak_move`),
    else a random block move (:func:`_random_block_move`). The memory change of the segment
    is judged first (Metropolis), then the incremental timing check rejects the move
    if the makespan would exceed ``mk_limit`` or the order deadlocks. ``state`` =
    ``[energy, best energy, temperature, iterations, best peak]``; ``prefix``/``peaks``
    must match ``order`` (see :func:`node_peaks`).
    """
    n_nodes = node_ptr.shape[0] - 1
    T = order.shape[0]
    ws = _workspace(T, n_nodes)
    cur = state[0]
    best = state[1]
    temp = state[2]
    best_peak = state[4]
    for _ in range(n_iters):
        temp *= cooling
        if np.random.random() < p_peak:
            lo, hi = _peak_move(order, node_ptr, node, memd, prefix, peaks, eps, ws)
        else:
            lo, hi = _random_block_move(order, node_ptr, node, klass, ws)
        if lo < 0:
            continue
        n = node[order[lo]]
        # the node's new peak: its prefix outside the segment is unchanged
        acc = prefix[lo - 1] if lo > node_ptr[n] else 0.0
        pk = 0.0
        for q in range(node_ptr[n], lo):
            if prefix[q] > pk:
                pk = prefix[q]
        for q in range(lo, hi + 1):
            acc += memd[order[q]]
            if acc > pk:
                pk = acc
        for q in range(hi + 1, node_ptr[n + 1]):
            if prefix[q] > pk:
                pk = prefix[q]
        old_pk = peaks[n]
        peaks[n] = pk
        energy = memory_energy(peaks, alpha)
        delta = energy - cur
        if delta > eps and (temp <= 0.0 or np.random.random() >= math.exp(-delta / temp)):
            peaks[n] = old_pk
            _revert(order, pos, start, end, lo, hi, 0, ws)
            continue
        mk, n_log = _retime(order, pos, node_ptr, dur, node, dep, succ, start, end, lo, hi, mk_limit + eps, ws)
        if mk < 0.0:
            peaks[n] = old_pk
            _revert(order, pos, start, end, lo, hi, n_log, ws)
            continue
        _refresh_prefix(order, node_ptr, node, memd, prefix, lo, hi)
        cur = energy
        peak = peaks.max()
        # lexicographic: the highest node peak first, the energy breaks ties
        if peak < best_peak - eps or (peak <= best_peak + eps and energy < best - eps):
            best = energy
            best_peak = peak
            best_order[:] = order
    state[0] = cur
    state[1] = best
    state[2] = temp
    state[3] += n_iters
    state[4] = best_peak
