"""``fusedrl realloc``: one real run on local workers, and bad input rejected up front."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fusedrl.cli.main import app


def test_realloc_tiny_verified():
    proc = subprocess.run(
        [sys.executable, "-m", "fusedrl.cli", "realloc", "--model", "tiny",
         "--src", "dp1tp2pp2@0-3", "--dst", "dp4tp1pp1@0-3", "--verify", "--repeats", "1",
         "--bucket-mb", "0.01", "--json"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"bytes_moved", "bytes_minimum", "seconds", "gbps", "memcpy_gbps",
                        "verified"}
    assert out["verified"] is True
    assert out["bytes_moved"] == out["bytes_minimum"] > 0
    assert out["seconds"] > 0 and out["memcpy_gbps"] > 0
    assert out["gbps"] == pytest.approx(out["bytes_moved"] / out["seconds"] / 1e9)


@pytest.mark.parametrize("args,message", [
    (["--src", "dp1tp2pp2@0,1,2,9", "--dst", "dp4tp1pp1@0-3"], "uses device 9"),
    (["--src", "dp1tp2pp1@0-1", "--dst", "dp2tp1pp1@0-1", "--num-devices", "1"],
     "cluster has 1 devices"),
    (["--src", "dp1tp3pp1@0-2", "--dst", "dp4tp1pp1@0-3"], "tp=3 does not divide num_heads=4"),
    (["--src", "dp1tp1pp8@0-7", "--dst", "dp4tp1pp1@0-3"], "pp=8 is larger than num_layers=4"),
    (["--model", "no-such-model", "--src", "dp1tp2pp1@0-1", "--dst", "dp2tp1pp1@0-1"],
     "unknown model 'no-such-model'"),
    (["--src", "dp1tp2pp1", "--dst", "dp2tp1pp1@0-1"], "is not of the form"),
    (["--src", "dp1tp2pp1@0-2", "--dst", "dp2tp1pp1@0-1"], "needs 2 devices, got 3"),
    (["--src", "dp1tp2pp1@0-1", "--dst", "dp2tp1pp1@0-1", "--bucket-mb", "0"], "--bucket-mb"),
    (["--src", "dp1tp2pp1@0-1", "--dst", "dp2tp1pp1@0-1", "--transport", "mpi"],
     "--transport must be collective or shm"),
    (["--src", "dp1tp2pp1@0-1", "--dst", "dp2tp1pp1@0-1", "--weights", "checkpoint"],
     "needs --model to be a checkpoint path"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    result = CliRunner().invoke(app, ["realloc", *args, "--json"])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert result.stdout == ""
