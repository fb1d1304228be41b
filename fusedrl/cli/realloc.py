"""``fusedrl realloc``: reshard a model between two placements on local worker processes.

Every input is checked in this process before any worker starts (one-line error,
exit code 2): the placements parse, use devices inside the local cluster of
``--num-devices`` emulated devices, and fit the model; the model is a preset or a
loadable checkpoint. Then one gloo worker per device id up to the highest one used
(rank == device id, one thread each) runs :mod:`fusedrl.realloc.local`.

Output (``--json``): ``bytes_moved`` (cross-device bytes, each receiver counted),
``bytes_minimum`` (what the destination devices lacked), ``seconds`` (best of
``--repeats`` runs, slowest worker), ``gbps`` = bytes_moved / seconds / 1e9,
``memcpy_gbps`` (one worker's best copy of a 256 MiB buffer in the same run, bytes
copied / seconds / 1e9: both count each payload byte once), ``verified`` (every
destination shard equals the shard of the full weights; ``null`` without
``--verify``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fusedrl.cli.common import fail, first_line, json_option


def realloc(
    model: str = typer.Option("tiny", "--model", help="Preset name or checkpoint path "
                              "(safetensors directory or .gguf)."),
    src: str = typer.Option(..., "--src", help="Source placement, e.g. dp1tp2pp2@0-3."),
    dst: str = typer.Option(..., "--dst", help="Destination placement, e.g. dp4tp1pp1@0-3."),
    verify: bool = typer.Option(False, "--verify", help="Check every destination shard."),
    bucket_mb: float = typer.Option(8.0, "--bucket-mb", help="Message / staging bucket (MiB)."),
    inflight: int = typer.Option(8, "--inflight", help="Outstanding messages per worker."),
    repeats: int = typer.Option(3, "--repeats", help="Runs; the best time is reported."),
    num_devices: int = typer.Option(8, "--num-devices", help="Devices of the local cluster."),
    weights: str = typer.Option("auto", "--weights", help="auto | random | synthetic | checkpoint "
                                "(auto: checkpoint for a path, random for tiny/small presets, "
                                "synthetic otherwise)."),
    transport: str = typer.Option("collective", "--transport", help="collective (gloo "
                                  "broadcast/p2p) | shm (shared-memory slots, one host)."),
    json_out: bool = json_option(),
) -> None:
    """Reshard MODEL from placement SRC to DST on local workers and report the bandwidth."""
    from fusedrl.layout import Placement
    from fusedrl.models.config import PRESETS
    from fusedrl.realloc.plan import plan_realloc

    # ---- validate everything before any worker starts --------------------------
    try:
        src_p, dst_p = Placement.parse(src), Placement.parse(dst)
    except ValueError as e:
        fail(str(e))
    if num_devices < 1:
        fail(f"--num-devices must be positive, got {num_devices}")
    if bucket_mb <= 0 or inflight < 1 or repeats < 1:
        fail("--bucket-mb must be positive, --inflight and --repeats at least 1")
    is_path = model not in PRESETS
    if is_path:
        if not Path(model).exists():
            fail(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) "
                 f"and no such checkpoint path")
        from fusedrl.models.checkpoint import CheckpointError, load_checkpoint

        try:
            config = load_checkpoint(model)[0]
        except (CheckpointError, ValueError, OSError) as e:
            fail(f"cannot load {model}: {first_line(e)}")
    else:
        config = PRESETS[model]
    try:
        plan = plan_realloc(config, src_p, dst_p, num_devices=num_devices)
    except ValueError as e:
        fail(str(e))
    if weights == "auto":
        weights = "checkpoint" if is_path else ("random" if model in ("tiny", "small")
                                                else "synthetic")
    if weights not in ("random", "synthetic", "checkpoint"):
        fail(f"--weights must be auto, random, synthetic or checkpoint, got {weights!r}")
    if transport not in ("collective", "shm"):
        fail(f"--transport must be collective or shm, got {transport!r}")
    if weights == "checkpoint" and not is_path:
        fail("--weights checkpoint needs --model to be a checkpoint path")

    # ---- run on local workers ----------------------------------------------------
    from fusedrl.realloc.local import ReallocJob, launch, run_jobs

    world = max(plan.src.devices + plan.dst.devices) + 1
    job = ReallocJob(model, str(src_p), str(dst_p), weights=weights, verify=verify,
                     bucket_bytes=max(1, int(bucket_mb * (1 << 20))), inflight=inflight,
                     transport=transport, repeats=repeats, memcpy_mb=256)
    try:
        per_rank = launch(run_jobs, world, ([job],))
    except (RuntimeError, TimeoutError) as e:
        typer.echo(f"error: realloc workers failed: {first_line(e)}", err=True)
        raise typer.Exit(code=1)
    r = per_rank[0][0]
    out = {k: r[k] for k in ("bytes_moved", "bytes_minimum", "seconds", "gbps", "memcpy_gbps",
                             "verified")}
    if json_out:
        typer.echo(json.dumps(out))
    else:
        frac = out["gbps"] / out["memcpy_gbps"] if out["memcpy_gbps"] else 0.0
        typer.echo(f"{plan.src} -> {plan.dst}: {out['bytes_moved'] / 1e6:.1f} MB moved "
                   f"(minimum {out['bytes_minimum'] / 1e6:.1f}) in {out['seconds'] * 1e3:.1f} ms"
                   f" = {out['gbps']:.2f} GB/s, {frac:.2f} of memcpy "
                   f"({out['memcpy_gbps']:.2f} GB/s); verified: {out['verified']}")
    if verify and not out["verified"]:
        raise typer.Exit(code=1)
