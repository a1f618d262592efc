"""The environment a benchmark writes beside its numbers."""

import os
import stat
from pathlib import Path

import jax
import pytest

from benchmarks.common import environment


def test_gpus_are_described_by_nvidia_smi_without_starting_jax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent process writes its results between its children's runs: starting JAX there would take
    most of the GPU's memory from the next child (the DiT benchmark's JAX and PyTorch loops ran out
    of memory that way)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04'\necho 'NVIDIA H100 80GB HBM3, 580.159.04'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def no_jax() -> None:
        raise AssertionError("jax.devices() was called")

    monkeypatch.setattr(jax, "devices", no_jax)
    env = environment()
    assert (env["device"], env["device_count"], env["driver"]) == ("NVIDIA H100 80GB HBM3", 2, "580.159.04")


def test_without_nvidia_smi_the_device_comes_from_jax(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    env = environment()
    assert (env["device"], env["device_count"], env["driver"]) == ("cpu", jax.device_count(), "")
