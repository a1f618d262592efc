"""``load_hf`` takes a Hugging Face hub model id as well as a folder: resolved through
``huggingface_hub.snapshot_download`` from a local cache (HF_HOME in a temporary folder, offline),
and a model id that is not cached is one line naming it, the cache and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.task.toy import ROOT
from xax.arch import Transformer, TransformerConfig
from xax.core.errors import ConfigError, HubError
from xax.interop import load_hf, save_hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Loads a cached model id and writes it back out, then asks for one that is not cached.
LOAD = """
import sys
import xax.interop
model = xax.interop.load_hf("xax-test/tiny-llama", overrides={"scan_layers": True})
xax.interop.save_hf(model, sys.argv[1], model_type="llama")
try:
    xax.interop.load_hf("xax-test/not-cached")
except Exception as error:
    print(type(error).__name__, error, sep="|")
"""


def _cache_model(hf_home: Path, repo_id: str, model: Transformer) -> Path:
    """Lays a model out in the hub cache as huggingface_hub does: a ref naming a commit's snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    save_hf(model, snapshot, model_type="llama")
    return snapshot


def test_a_cached_model_id_loads_offline_and_a_missing_one_is_one_line(tmp_path: Path) -> None:
    config = TransformerConfig(
        vocab_size=64, max_seq_len=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, positions="rope",
        norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False, tie_embeddings=False,
    )  # fmt: skip
    snapshot = _cache_model(tmp_path / "hf", "xax-test/tiny-llama", Transformer(config, key=jax.random.key(0)))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env = {**base, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved, reloaded = load_file(snapshot / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(saved) == sorted(reloaded)
    for name, value in saved.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)

    assert result.stdout.count("\n") == 1, result.stdout
    kind, message = result.stdout.strip().split("|")
    assert kind == "HubError"
    assert message == (
        "load_hf: 'xax-test/not-cached' is not a local folder, nor in the Hugging Face cache "
        f"({tmp_path / 'hf' / 'hub'}), and offline mode is on (HF_HUB_OFFLINE); give the folder save_pretrained "
        "wrote, or load the model once with network access"
    )


def test_a_path_that_is_neither_folder_nor_model_id_is_named(tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"'.*/no/such/folder' is neither a local folder nor a Hugging Face model id"):
        load_hf(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ConfigError, match=r"revision='v1' is for a hub model id; .* is a local folder"):
        load_hf(tmp_path, revision="v1")
