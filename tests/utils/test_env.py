"""The environment a run records: an allow-list, never a credential."""

import pytest

from xax.utils.env import recorded_environment


def test_only_allow_listed_variables_without_secret_names_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XLA_FLAGS", "JAX_ENABLE_X64", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, f"value-of-{name}")
    for name in ("JAX_API_TOKEN", "XLA_SECRET", "CUDA_PASSWORD", "NCCL_AUTH_KEY", "HF_TOKEN", "HOME_DIR", "PATHX"):
        monkeypatch.setenv(name, "hunter2")
    recorded = recorded_environment()
    for name in ("XLA_FLAGS", "JAX_ENABLE_X64", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS"):
        assert recorded[name] == f"value-of-{name}"
    assert "hunter2" not in recorded.values()
    assert list(recorded) == sorted(recorded)
