"""``fusedrl train``: the command, and the training run it drives (:func:`train`, the
Python API of a run): progress bar, one log line per iteration, metrics.jsonl,
periodic atomic checkpoints and ``--resume``.

Crash safety (a run is killed, pre-empted or OOM-killed and restarted, often by a
scheduler that always passes ``--resume``):

- one writer per run directory: :class:`RunLock` (``OUT/.lock``, holding the writer's
  PID and host) is taken before anything is written; the kernel drops it when its
  holder dies, so a stale lock is taken over, a live one refuses the second writer;
- ``--resume`` always works: torn trailing lines of ``metrics.jsonl`` are dropped, a run
  killed before its first checkpoint restarts from iteration 0, leftovers of killed
  checkpoint writes are removed, and a checkpoint of another runtime is refused;
- a failed iteration (a reward function or a non-finite loss) writes nothing: the
  run's files change only once its first iteration succeeded (config.yaml, the
  metrics rewrite of a resume) and each iteration's line is appended after its checks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# fusedrl.algorithms and fusedrl.checkpointing (torch) are imported where a run needs
# them: the command group imports this module, and `fusedrl --help` or `fusedrl plan`
# should not wait for torch.
from fusedrl.cli.common import DEFAULT_CONFIG, fail, first_line, quiet
from fusedrl.config import Config, ConfigError, config_to_yaml

LOCK_NAME = ".lock"


class NonFiniteError(ValueError):
    """An iteration produced a NaN or infinite loss, score or gradient norm."""


class WorkerDiedError(RuntimeError):
    """A Ray worker of the run died (killed, OOM, segfault); exit code 3."""


# ------------------------------------------------------------------ run directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_text(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


class RunLock:
    """Exclusive writer lock of a run directory: ``OUT/.lock`` held with ``flock`` and
    holding ``{"pid", "host", "since"}`` for the message a second writer gets.

    ``flock`` is released by the kernel when the holder dies (also SIGKILL), so a lock
    file left by a dead run is simply taken over; on a file system without ``flock``
    the holder's PID is checked instead (same host only). Creates ``out`` if needed and
    removes it again on release if the run wrote nothing else."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False
        self.took_over: dict | None = None  # the dead holder whose lock was taken over

    def acquire(self) -> "RunLock":
        try:
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self.created_dir = True
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise ConfigError(self._busy(_read_holder(self.path))) from None
                    fd = self._acquire_without_flock()
                # The holder before us may have unlinked the file between our open and
                # our lock: then we locked an orphan inode, so retry on the new file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            previous = _read_holder(self.path)
            if previous.get("pid"):
                self.took_over = previous
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            raise ConfigError(_out_error(self.out, e)) from None
        self.fd = fd
        return self

    def _acquire_without_flock(self) -> int:
        """No ``flock`` on this file system (some network mounts): a live holder on this
        host refuses us; a lock of another host is honoured, since its PID cannot be
        checked from here."""
        holder = _read_holder(self.path)
        pid, host = holder.get("pid"), holder.get("host")
        if pid and (host != socket.gethostname() or _pid_alive(int(pid))) \
                and int(pid) != os.getpid():
            raise ConfigError(self._busy(holder) + f" (if it is dead, delete {self.path})")
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _busy(self, holder: dict) -> str:
        since = f", since {holder['since']}" if holder.get("since") else ""
        return (f"--out {self.out} is in use by another fusedrl run ({_holder_text(holder)}"
                f"{since}); wait for it to end or choose another --out")

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock: a waiter that opened the old file finds
        # its inode gone and retries (acquire's inode check).
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            try:
                self.out.rmdir()  # only if the run left nothing in it
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def probe_lock(out: Path) -> None:
    """The busy error of :class:`RunLock` if a live run holds ``out``'s lock; reads only."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(RunLock(out)._busy(_read_holder(out / LOCK_NAME))) from None
    finally:
        os.close(fd)


def _out_error(out: Path, e: OSError) -> str:
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
    return f"--out {out}: {e.strerror or e}{where}"


def check_out_path(out: Path) -> None:
    """A one-line :class:`ConfigError` if ``out`` cannot be a run directory: a file, under
    a file, or in a directory this process may not write."""
    p = out
    while True:
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"--out {out} {what}, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out}: no permission to write in {p}")
            return
        if p.parent == p:
            return
        p = p.parent


@dataclass
class RunState:
    """What ``out`` holds, read before anything is written."""

    ckpt: Path | None = None
    """Checkpoint to resume from (None: start at iteration 0)."""
    lines: list[str] = field(default_factory=list)
    """Parsable lines of metrics.jsonl up to the checkpoint's iteration (kept on resume)."""
    notes: list[str] = field(default_factory=list)
    """What resuming changes, said once on the console."""


def read_metrics_lines(path: Path) -> tuple[list[tuple[int, str]], int]:
    """``(iteration, line)`` of each line of ``path`` and the number of unparsable trailing
    lines (a line torn by a kill); an unparsable line with good lines after it is a
    :class:`ConfigError` naming the line."""
    if not path.exists():
        return [], 0
    good, bad = [], []
    for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            it = obj["iteration"]
            if not isinstance(it, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            bad.append(n)
            continue
        if bad:
            raise ConfigError(f"{path}: line {bad[0]} is not a metrics record but later lines "
                              f"are; fix or remove it")
        good.append((it, line))
    return good, len(bad)


def inspect_out_dir(out: Path, resume: bool, config: Config) -> RunState:
    """Check ``out`` before anything is written: refuse an existing run without
    ``--resume``; with it, find the checkpoint (none: restart at iteration 0), check
    this run can continue it, and plan the metrics lines to keep."""
    from fusedrl.checkpointing import check_resumable, latest_checkpoint

    metrics = out / "metrics.jsonl"
    if not resume:
        if metrics.exists() or latest_checkpoint(out) is not None:
            raise ConfigError(f"output directory {out} already holds a run; pass --resume to "
                              f"continue it or choose another --out")
        return RunState()
    state = RunState(ckpt=latest_checkpoint(out))
    start = 0
    if state.ckpt is None:
        state.notes.append(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting "
                           f"from iteration 0")
    else:
        start = int(check_resumable(state.ckpt, config)["iteration"])
    good, torn = read_metrics_lines(metrics)
    if torn:
        state.notes.append(f"{metrics}: dropping {torn} unparsable trailing line(s) (a write "
                           f"cut short)")
    state.lines = [line for it, line in good if it <= start]
    if len(state.lines) < len(good):
        state.notes.append(f"{metrics}: dropping {len(good) - len(state.lines)} line(s) past "
                           f"iteration {start}, the checkpoint resumed from")
    return state


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per iteration to ``metrics.jsonl`` (flushed and fsynced)."""

    def __init__(self, path: Path):
        self.path = path

    def rewrite(self, lines: list[str]) -> None:
        """Replace the file by ``lines`` (a resume drops lines past its checkpoint and
        torn ones), atomically."""
        write_atomic(self.path, "".join(line + "\n" for line in lines))

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------- checks


def check_finite(metrics: dict) -> None:
    """A :class:`NonFiniteError` naming the iteration and the keys if a loss, score, KL,
    value or gradient norm is NaN or infinite: the weights are then already garbage, and
    neither its metrics line nor a checkpoint may be written. Timings and throughput are
    not checked."""
    bad = [(k, v) for k, v in metrics.items()
           if not k.startswith(("timing_s/", "perf/")) and isinstance(v, float)
           and not math.isfinite(v)]
    if bad:
        first = ", ".join(f"{k}={v}" for k, v in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(f"iteration {metrics.get('iteration', '?')}: non-finite {first}"
                             f"{more}; stopped before writing its metrics or a checkpoint "
                             f"(check the learning rates, ppo.kl_coef and the rewards)")


def _actor_error(e: BaseException, depth: int = 0):
    """The ``RayActorError`` (a worker died) in ``e`` or its causes, else None."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return None
    if e is None or depth > 8:
        return None
    if isinstance(e, RayActorError):
        return e
    for inner in (getattr(e, "cause", None), e.__cause__, e.__context__):
        if isinstance(inner, BaseException) and inner is not e:
            found = _actor_error(inner, depth + 1)
            if found is not None:
                return found
    return None


def _ray_cause(error_msg: str) -> str:
    """Ray's reason for an actor's death, on one line, without its OOM advice."""
    text = " ".join(str(error_msg).split())
    for marker in ("Worker exit detail:", "The actor is dead because"):
        i = text.find(marker)
        if i >= 0:
            text = text[i + len(marker):].strip()
            break
    cut = text.find(" There are some potential root causes")
    text = text[:cut] if cut >= 0 else text
    return text[:200] or "unknown cause"


def _run_workers(trainer) -> list:
    stages = getattr(trainer, "stages", None)
    cluster = getattr(stages, "cluster", None)
    return list(getattr(cluster, "workers", None) or getattr(trainer, "workers", None) or [])


def _kill_workers(trainer) -> None:
    """Kill every worker of the run at once: after one died, the others may be blocked
    in a collective with it, and a graceful shutdown would wait for them."""
    import ray

    if not ray.is_initialized():  # ray.kill would start a Ray instance
        return
    for w in _run_workers(trainer):
        try:
            ray.kill(w, no_restart=True)
        except Exception:  # already dead, or Ray itself is going down
            pass


def describe_dead_worker(trainer, err) -> str:
    """One line for a dead Ray worker: its device (its actor id matched against the run's
    workers, ``trainer.stages.cluster.workers``), the roles placed on that device
    (``trainer.stages.placements``) and Ray's cause."""
    from fusedrl.layout import Placement

    stages = getattr(trainer, "stages", None)
    workers = _run_workers(trainer)
    placements = getattr(stages, "placements", None) or getattr(trainer, "placements", None) \
        or {}
    actor_id = getattr(err, "actor_id", None)
    device = None
    cluster = getattr(stages, "cluster", None)
    if actor_id is not None and hasattr(cluster, "device_of_actor"):
        device = cluster.device_of_actor(actor_id)
        if device is not None:
            served = ", ".join(cluster.roles_on(device))
            return (f"Ray worker on device {device}" + (f" serving {served}" if served else "")
                    + f" died: {_ray_cause(getattr(err, 'error_msg', err))} (exit 3; "
                    f"continue with --resume)")
    for d, w in enumerate(workers):
        handle_id = getattr(w, "_actor_id", None)
        if actor_id is not None and handle_id is not None and handle_id.hex() == actor_id:
            device = d
    roles = []
    if device is not None:
        for role, p in placements.items():
            try:
                devices = (Placement.parse(p) if isinstance(p, str) else p).devices
            except (ValueError, AttributeError):
                continue
            if device in devices:
                roles.append(role)
    where = f"device {device}" if device is not None else "a device"
    served = f" serving {', '.join(roles)}" if roles else ""
    return (f"Ray worker on {where}{served} died: {_ray_cause(getattr(err, 'error_msg', err))}"
            f" (exit 3; continue with --resume)")


# ------------------------------------------------------------------------ train


def train(config: Config, out: Path, resume: bool = False, console: Console | None = None,
          show_progress: bool = True) -> list[dict]:
    """Run ``config`` into ``out``; returns the metrics of the iterations run here.

    Raises :class:`ConfigError` (and other ``ValueError``) for bad input, a busy or
    unusable ``out``, a checkpoint this run cannot continue, a failing reward function
    or a non-finite iteration, and :class:`WorkerDiedError` when a Ray worker dies."""
    from fusedrl.checkpointing import clean_checkpoint_dir
    from fusedrl.runtime.launch import is_single_device, probe_ray_address

    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(out)
    check_out_path(out)
    probe_lock(out)  # fail fast, before the (slow) setup
    inspect_out_dir(out, resume, config)
    if config.cluster.address and not is_single_device(config):
        probe_ray_address(config.cluster.address)  # an unreachable --cluster: in seconds

    import torch

    from fusedrl.runtime.launch import make_trainer
    from fusedrl.trainer import build_setup
    torch.manual_seed(config.trainer.seed)
    setup = build_setup(config)  # validates data, models, rewards before writing anything
    with RunLock(out) as lock:
        if lock.took_over:
            console.print(f"{out}: taking over the lock of a dead run "
                          f"({_holder_text(lock.took_over)})")
        run = inspect_out_dir(out, resume, config)  # again, now that no one else writes
        for name in clean_checkpoint_dir(out):
            console.print(f"{out / 'checkpoints'}: removed {name} (left by a killed run)")
        for note in run.notes:
            console.print(note)
        try:
            trainer = make_trainer(config, setup)  # in-process, or Ray workers per placement
        except Exception as e:  # a worker that dies while the workers start
            if _actor_error(e) is None:
                raise
            raise WorkerDiedError(describe_dead_worker(None, _actor_error(e))) from None
        try:
            return _loop(config, trainer, out, run, console, show_progress)
        except Exception as e:
            dead = _actor_error(e)
            if dead is None:
                raise
            message = describe_dead_worker(trainer, dead)
            _kill_workers(trainer)  # the survivors may wait on the dead one's collectives
            raise WorkerDiedError(message) from None
        finally:
            trainer.close()


def _loop(config: Config, trainer, out: Path, run: RunState, console: Console,
          show_progress: bool) -> list[dict]:
    from fusedrl.algorithms.rewards import RewardError
    from fusedrl.checkpointing import prune_checkpoints
    from fusedrl.tracking import Tracker

    writer = MetricsWriter(out / "metrics.jsonl")
    if run.ckpt is not None:
        trainer.load_checkpoint(run.ckpt)
        console.print(f"resumed from {run.ckpt} at iteration {trainer.iteration}")
    tracker = None
    t = config.trainer
    pending = []  # logged once the run directory is committed (after iteration 1's checks)
    if t.val_before_train and trainer.iteration == 0:
        pending.append({"iteration": 0, **trainer.validate()})

    total = config.trainer.iterations
    history = []
    committed = False  # nothing of the run directory changes before one iteration passed
    columns = (TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show_progress,
                  transient=False) as progress:
        task = progress.add_task("ppo", total=total, completed=trainer.iteration)
        while trainer.iteration < total:
            try:
                metrics = trainer.step()
            except RewardError as e:  # name the iteration too; nothing of it was written
                raise RewardError(f"iteration {trainer.iteration + 1}: {e}") from None
            if t.val_every and (trainer.iteration % t.val_every == 0 or
                                trainer.iteration == total):
                metrics.update(trainer.validate())
            check_finite(metrics)
            if not committed:
                writer.rewrite(run.lines)
                write_atomic(out / "config.yaml", config_to_yaml(config))
                committed = True
                # jsonl always: --resume reads metrics.jsonl
                tracker = Tracker(set(t.logger) | {"jsonl"}, out, project=t.project_name,
                                  experiment=t.experiment_name or None,
                                  config=config.to_dict(), total_steps=total,
                                  resume_step=metrics["iteration"] if run.ckpt else None)
                for row in pending:
                    tracker.log(row, row["iteration"])
            tracker.log(metrics, metrics["iteration"])
            history.append(metrics)
            if t.log_samples:
                with open(out / "samples.jsonl", "a") as f:
                    for row in trainer.last_samples:
                        f.write(json.dumps({"iteration": trainer.iteration, **row}) + "\n")
            every = config.trainer.timeline_every
            if every and trainer.iteration % every == 0:
                write_timeline(trainer, out / "timeline" / f"iter_{trainer.iteration}")
            progress.update(task, completed=trainer.iteration)
            every = config.trainer.save_every
            if (every and trainer.iteration % every == 0) or trainer.iteration == total:
                trainer.save_checkpoint(out)
                prune_checkpoints(out, config.trainer.keep_checkpoints, protect=run.ckpt)
    if tracker is not None:
        tracker.close()
    return history


def write_timeline(trainer, stem: Path) -> None:
    """The last iteration's per-device events as ``stem.png`` (measured timeline) and
    ``stem.jsonl`` (one event per line, seconds from the iteration's start)."""
    from fusedrl.timeline import plot_timeline, to_rows

    stem.parent.mkdir(parents=True, exist_ok=True)
    start = trainer.last_window[0]
    rows = to_rows(trainer.last_events, start)
    write_atomic(stem.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    if trainer.last_events:
        plot_timeline(trainer.last_events, stem.with_suffix(".png"), origin=start,
                      title=f"iteration {trainer.iteration}: model calls per device "
                            f"(measured)")


# ---------------------------------------------------------------------- command


def train_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML config (default: the embedded default)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: key=value."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="Join this Ray cluster (the address `ray start --head` "
                                "printed) instead of starting a local one; sets cluster.address."),
    plan: Optional[str] = typer.Option(
        None, "--plan", help="Execution plan: a PLAN.yaml (fusedrl plan --out) or 'auto' (search "
                             "one for this config on cluster.devices CPU devices, write it to "
                             "OUT/plan.yaml); applied before --set."),
    plan_time_limit: float = typer.Option(10.0, "--plan-time-limit",
                                          help="Seconds of each search chain of --plan auto."),
    plugin: List[str] = typer.Option(
        [], "--plugin", help="Import this module (a name, or a path to a .py file) in the "
                             "driver and every worker before the config is checked, so what "
                             "it registers can be named in the config; repeatable, adds to "
                             "the config's plugins list."),
) -> None:
    """Train with PPO; writes OUT/metrics.jsonl and OUT/checkpoints/iter_N/.

    Exit codes: 0 done, 2 bad input or a failed iteration (one line on stderr: a config
    key, a file, a busy --out, a reward function, a non-finite loss), 3 a Ray worker
    died (one line: its device, roles and Ray's cause)."""
    quiet()
    import torch

    from fusedrl.config import load_config

    if threads < 0:
        fail(f"--threads {threads}: must be >= 0 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)
    try:
        overrides = list(set_) + ([f"cluster.address={cluster}"] if cluster else [])
        cfg = load_config(config if config is not None else DEFAULT_CONFIG, overrides,
                          plugins=plugin)
        out_dir = out if out is not None else Path(cfg.trainer.out_dir)
        if plan is not None:
            from fusedrl.cli.plan import train_config_with_plan

            overrides.append(f"plugins={json.dumps(cfg.plugins)}")  # --plugin's as well
            cfg = train_config_with_plan(plan, config if config is not None else DEFAULT_CONFIG,
                                         overrides, cfg, out_dir, time_limit=plan_time_limit)
        train(cfg, out_dir, resume=resume)
    except WorkerDiedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=3)
    except (ValueError, FileNotFoundError) as e:
        fail(first_line(e))
