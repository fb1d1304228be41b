"""The GPU install resolves: ``pip install 'fusedrl[gpu,vllm]'`` on a Linux x86-64 CUDA
machine gets one consistent set (vllm's torch, cupy for torch's CUDA major).

pip's resolver runs for that platform from package metadata alone (``--dry-run
--report``, PEP 658 metadata files, no wheel downloads), whatever this machine is. It
needs the package registry; without it the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# The oldest glibc a current GPU node runs (Ubuntu 22.04: 2.35); pip takes each
# accepted platform tag literally, so every older manylinux tag is listed too.
GLIBC_MINOR = 35
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 16, -1)] + [
    "manylinux2014_x86_64"]


def _pip_env() -> dict:
    env = dict(os.environ)
    # This machine's pip settings cap torch and add CPU wheels from disk; a GPU
    # machine has neither, so resolve without them.
    env["PIP_CONSTRAINT"] = ""
    env["PIP_FIND_LINKS"] = ""
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=_pip_env(), timeout=timeout, cwd=ROOT)


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {k: [Requirement(r) for r in v] for k, v in project["optional-dependencies"].items()}


def _pinned(reqs: list[Requirement], name: str) -> str:
    for r in reqs:
        if r.name == name:
            (spec,) = r.specifier
            assert spec.operator == "==", f"{name} is not pinned in the extra: {r}"
            return spec.version
    raise AssertionError(f"no {name} in {reqs}")


def _cuda_major_of_cupy(name: str) -> int:
    m = re.fullmatch(r"cupy-cuda(\d+)x", name)
    assert m, f"cupy package {name!r} does not name a CUDA major"
    return int(m.group(1))


def test_extras_pin_one_torch_and_a_cupy_per_cuda_major():
    extras = _extras()
    torch_pins = {_pinned(extras[e], "torch") for e in ("gpu", "vllm")}
    assert len(torch_pins) == 1, f"extras gpu and vllm pin different torch: {torch_pins}"
    cupy = [r for r in extras["gpu"] if r.name.startswith("cupy")]
    assert len(cupy) == 1 and "ctk" in cupy[0].extras, cupy
    _cuda_major_of_cupy(cupy[0].name)


@pytest.fixture(scope="module")
def gpu_resolution(tmp_path_factory) -> dict[str, dict]:
    """``name -> metadata`` of what pip would install for ``fusedrl[gpu,vllm]`` on Linux
    x86-64 with this Python version."""
    try:
        probe = _pip("index", "versions", "vllm", "--timeout", "15", "--retries", "1",
                     timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("package registry not reachable (pip index versions vllm timed out)")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"package registry not reachable (pip index versions vllm: {last})")
    tmp = tmp_path_factory.mktemp("resolve")
    report = tmp / "report.json"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    args = ["install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
            "--target", str(tmp / "target"), "--only-binary=:all:", "--python-version", py]
    for p in PLATFORMS:
        args += ["--platform", p]
    proc = _pip(*args, f"{ROOT}[gpu,vllm]", timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert proc.returncode == 0, "pip cannot resolve fusedrl[gpu,vllm]: " + " | ".join(errors)
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"] for i in installs}


@pytest.mark.slow  # ~1-2.5 min: metadata of ~210 packages
def test_gpu_extras_resolve_to_one_cuda_major(gpu_resolution):
    got = gpu_resolution
    extras = _extras()
    # The pins are what pip picks (no silent fallback to an older vllm, as an unpinned
    # extra did: vllm 0.33 needs torch 2.14, the base pin was 2.13 -> vllm 0.32).
    assert got["torch"]["version"] == _pinned(extras["gpu"], "torch")
    assert got["vllm"]["version"] == _pinned(extras["vllm"], "vllm")
    (cupy_req,) = [r for r in extras["gpu"] if r.name.startswith("cupy")]
    assert got[cupy_req.name]["version"] == _pinned(extras["gpu"], cupy_req.name)
    # vllm's own torch requirement holds for the torch resolved.
    (vllm_torch,) = [Requirement(r) for r in got["vllm"]["requires_dist"]
                     if Requirement(r).name == "torch" and Requirement(r).marker is None]
    assert vllm_torch.specifier.contains(got["torch"]["version"]), vllm_torch
    # torch's CUDA major (the toolkit its Linux wheel depends on) is cupy's, and the
    # toolkit resolved is of that major.
    (toolkit,) = [Requirement(r) for r in got["torch"]["requires_dist"]
                  if Requirement(r).name == "cuda-toolkit"]
    (spec,) = toolkit.specifier
    torch_cuda = int(spec.version.split(".")[0])
    assert _cuda_major_of_cupy(cupy_req.name) == torch_cuda
    assert int(got["cuda-toolkit"]["version"].split(".")[0]) == torch_cuda
