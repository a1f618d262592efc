"""The Tiny Shakespeare example: its data, short real runs of both models, and sampling from a checkpoint."""

from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

import xax
from examples.shakespeare import (
    DATA_PATH,
    DATA_SHA256,
    Config,
    Shakespeare,
    Vocabulary,
    corpus,
    load_text,
    split_text,
    window_dataset,
)
from tests.task.loggers.test_tensorboard import read_events, tag_values
from tests.task.toy import read_jsonl
from xax.arch.transformer import Transformer
from xax.data import table_to_batch
from xax.task.loggers.tensorboard import preformatted

# Small enough to learn something in 50 CPU steps.
TINY = (
    "context=32",
    "batch_size=32",
    "valid_batch_size=512",
    "max_steps=50",
    "valid_every_n_steps=50",
    "learning_rate=1e-2",
    "min_learning_rate=1e-3",
    "warmup_steps=5",
    "precision.compute_dtype=float32",
    "num_chars=20",  # one chunk of the GPT's 32-character context: one compilation
    "log.every_n_steps=10",
    "log.every_n_seconds=null",
    "log.heavy_every_n_seconds=null",  # media at the step cadence only, however slow the machine
    "log.heavy_every_n_steps=50",
)


def launch(run_dir: Path, *overrides: str) -> xax.State:
    return Shakespeare.launch(Config(), argv=[f"artifacts.run_dir={run_dir}", "log.stdout=false", *TINY, *overrides])


def test_text_is_verified_and_split_90_10(tmp_path: Path) -> None:
    text = corpus()
    train, valid = split_text(text)
    assert train + valid == text
    assert len(train) == 1_003_854 and len(valid) == 111_540
    vocab = Vocabulary.of(text)
    assert len(vocab) == 65 and vocab.chars[:3] == "\n !" and vocab.decode(vocab.encode(valid[:500])) == valid[:500]
    corrupt = tmp_path / "input.txt"
    corrupt.write_bytes(DATA_PATH.read_bytes().replace(b"ROMEO", b"ROMEX", 1))
    with pytest.raises(xax.DataError, match="SHA-256"):
        load_text(corrupt, DATA_SHA256)
    with pytest.raises(xax.DataError, match=r"\['~'\]"):
        vocab.encode("ROMEO~")


def test_windows_hold_next_character_targets() -> None:
    vocab = Vocabulary.of(corpus())
    _, valid = split_text(corpus())
    ids = vocab.encode(valid)
    dataset = window_dataset(ids, context=32, stride=32)
    # Disjoint windows covering the held-out text up to a remainder shorter than one window.
    assert len(dataset) == (len(ids) - 1) // 32
    rows = table_to_batch(dataset.with_format("arrow")[:], ["tokens", "targets"])  # as the loader reads it
    assert rows["tokens"].dtype == np.int32 and rows["tokens"].shape == (len(dataset), 32)
    np.testing.assert_array_equal(rows["tokens"].reshape(-1), ids[: len(dataset) * 32])
    np.testing.assert_array_equal(rows["targets"].reshape(-1), ids[1 : len(dataset) * 32 + 1])
    overlapping = window_dataset(ids, context=32, stride=8).with_format("numpy")
    assert vocab.decode(overlapping[5]["tokens"]) == valid[40:72]


def _check_run(run_dir: Path, min_drop: float) -> str:
    records = read_jsonl(run_dir / "log.jsonl")
    train = [r["scalars"] for r in records if r["phase"] == "train"]
    valid = [r["scalars"] for r in records if r["phase"] == "valid" and "loss" in r["scalars"]]
    # A fresh model predicts nearly uniformly: ln 65 = 4.17 nats.
    assert train[0]["loss"] > train[-1]["loss"] and train[-1]["loss"] < np.log(65) - min_drop
    # Below the 3.35 nats of the best context-free (unigram) model: the model uses context.
    assert valid[-1]["loss"] < 3.2
    assert valid[-1]["bits_per_char"] == pytest.approx(valid[-1]["loss"] / np.log(2.0), rel=1e-5)
    texts = [r["texts"]["sample"] for r in records if "sample" in r.get("texts", {})]
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0]) == len("ROMEO:") + 20
    (step, value), *_ = tag_values(read_events(run_dir / "tensorboard" / "valid"))["sample/text_summary"]
    assert step == 50 and value.tensor.string_val[0].decode() == preformatted(texts[0])
    return texts[0]


def test_gpt_learns_logs_a_sample_and_samples_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    launch(tmp_path / "train", "gpt.num_layers=2", "gpt.d_model=64", "gpt.num_heads=4")
    logged = _check_run(tmp_path / "train", min_drop=1.0)
    capsys.readouterr()
    # Model settings come from the checkpoint: no gpt.* overrides here.
    launch(tmp_path / "sample", "mode=sample", f"resume={tmp_path / 'train'}", 'prompt="ROMEO:"')
    printed = capsys.readouterr().out
    # Same weights, prompt and key as the logged sample, and float32 throughout: the same text.
    assert printed == logged + "\n"


def test_ssm_learns_and_logs_a_sample(tmp_path: Path) -> None:
    launch(tmp_path, "model=ssm", "ssm.d_model=32", "ssm.num_layers=2", "ssm.d_state=4")
    _check_run(tmp_path, min_drop=0.8)


def test_config_mistakes_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for override, message in (
        ("model=rnn", "model='rnn' is not one of ['gpt', 'ssm']"),
        ("prompt=ROMEO~", "prompt='ROMEO~'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            launch(tmp_path / override.split("=")[0], override)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch(tmp_path / "sample", "mode=sample")
    assert "mode=sample needs resume=" in capsys.readouterr().err


def test_default_model_has_nanogpts_parameter_count() -> None:
    config = Config()
    assert (config.context, config.batch_size, config.precision.compute_dtype) == (256, 64, "bfloat16")
    # Shapes only: nothing is initialized.
    model = eqx.filter_eval_shape(Shakespeare(config).get_model, xax.InitParams(key=jax.random.key(0)))
    assert isinstance(model, Transformer) and model.embed_positions is not None
    params = jax.tree.leaves(eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    # nanoGPT's shakespeare-char prints "number of parameters: 10.65M", position table excluded.
    assert sum(p.size for p in params) - model.embed_positions.weight.size == 10_646_784
