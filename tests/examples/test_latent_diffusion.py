"""The latent diffusion example: stage 1 (VAE, latents to ArrayRecord) then stage 2 (mmDiT on them), the exact
resume of a stage-2 run over its ArrayRecord shards, a shard missing at launch, and the sharded plans."""

import io
import json
from dataclasses import replace
from pathlib import Path

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageSequence
from typing_extensions import override

import xax
from examples.latent_diffusion import Config, LatentDiffusion, TextToImage
from examples.latent_text import (
    build_encoder,
    build_tokenizer,
    caption_table,
    captions_of,
    num_captions,
    word_tokenizer,
)
from tests.task.loggers.test_tensorboard import read_events, tag_values
from tests.task.toy import read_jsonl
from xax.arch import Transformer, TransformerConfig
from xax.data import read_manifest, read_records
from xax.interop import save_hf

NUM_TRAIN, NUM_TEST = 256, 64
COMMON = (
    "log.stdout=false",
    "log.every_n_steps=1",
    "log.every_n_seconds=null",
    "log.heavy_every_n_seconds=null",
    "precision.compute_dtype=float32",
    "warmup_steps=2",
    "ema.decay=0.8",
    "valid_batch_size=64",
    "valid_every_n_steps=null",  # no validation pass: one compilation less (media still use a test batch)
    "launcher.kind=single_device",
)
STAGE1 = (
    "stage=1",
    "batch_size=32",
    "learning_rate=3e-3",
    "autoencoder.base_channels=8",
    "autoencoder.norm_groups=4",
    "latent_shards=2",
)
STAGE2 = (
    "stage=2",
    "batch_size=32",
    "learning_rate=5e-3",
    "mmdit.d_model=32",
    "mmdit.num_layers=2",
    "mmdit.num_heads=2",
    "mmdit.frequency_dim=16",
    "text_width=16",
    "sampling_steps=3",
    "num_per_class=2",
)
TILE = 28 + 2  # a digit and the grid's 2-pixel gap
TASKS: list[LatentDiffusion] = []  # every launched task, the last one last


class SmallLatentDiffusion(LatentDiffusion):
    """The example on the first 256 training and 64 test digits (stage 1 trains on and encodes those)."""

    @override
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        dataset = super().get_dataset(phase)
        if self.config.stage == 1:
            return dataset.select(range(NUM_TRAIN if phase == "train" else NUM_TEST))
        return dataset

    @override
    def on_run_start(self) -> None:
        TASKS.append(self)
        super().on_run_start()


class NineStepSchedule(SmallLatentDiffusion):
    """The learning-rate schedule of a 9-step run, whatever step this launch stops at."""

    @override
    def expected_total_steps(self) -> int | None:
        return 9


def launch(run_dir: Path, *overrides: str, task: type[LatentDiffusion] = SmallLatentDiffusion) -> LatentDiffusion:
    task.launch(Config(), argv=[f"artifacts.run_dir={run_dir}", *COMMON, *overrides])
    return TASKS[-1]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished stage-1 run (8 steps) and its latents."""
    run_dir = tmp_path_factory.mktemp("stage1")
    launch(run_dir, *STAGE1, "max_steps=8", "log.heavy_every_n_steps=8")
    return run_dir


def final_params(task: LatentDiffusion) -> xax.TrainState:
    """The train state a finished run left behind."""
    assert task.final_train_state is not None
    return task.final_train_state


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["scalars"]["loss"]) for r in read_jsonl(run_dir / "log.jsonl") if r["phase"] == "train"]


def test_stage1_logs_its_terms_and_a_grid_and_writes_every_digit_as_a_latent(stage1: Path) -> None:
    records = read_jsonl(stage1 / "log.jsonl")
    train = [r["scalars"] for r in records if r["phase"] == "train"]
    # A fresh decoder outputs near zero: a squared error of about sum(x^2) per digit, which training cuts.
    assert train[-1]["reconstruction"] < 0.7 * train[0]["reconstruction"]
    assert all(
        s["kl"] > 0 and s["loss"] == pytest.approx(s["reconstruction"] + 1e-3 * s["kl"], rel=1e-4) for s in train
    )
    ((step, grid),) = tag_values(read_events(stage1 / "tensorboard" / "valid"))["reconstructions"]
    assert step == 8 and (grid.image.width, grid.image.height) == (8 * TILE + 2, 2 * TILE + 2)
    # The latents: every digit once, in order, with its label, as the manifest says.
    manifest = read_manifest(stage1 / "latents", "train")
    assert manifest["records"] == NUM_TRAIN and len(manifest["shards"]) == 2
    assert manifest["metadata"]["latent_shape"] == [4, 7, 7]
    assert manifest["metadata"]["vae_checkpoint"] == str(stage1 / "checkpoints" / "8")
    train_records = read_records(stage1 / "latents", "train")
    labels = np.asarray(load_labels(NUM_TRAIN))
    got = [train_records[i] for i in range(NUM_TRAIN)]
    assert [int(r["index"]) for r in got] == list(range(NUM_TRAIN))
    np.testing.assert_array_equal([int(r["label"]) for r in got], labels)
    assert read_manifest(stage1 / "latents", "test")["records"] == NUM_TEST


def load_labels(count: int) -> list[int]:
    from examples.mnist_data import load_mnist

    return list(load_mnist("train").with_format("numpy")[:count]["label"])


def test_stage2_learns_on_the_latents_and_logs_decoded_samples(stage1: Path, tmp_path: Path) -> None:
    launch(
        tmp_path, *STAGE2, f"latents={stage1 / 'latents'}", "max_steps=12",
        "log.heavy_every_n_steps=12",
    )  # fmt: skip
    losses = [loss for _, loss in _train_losses(tmp_path)]
    # A fresh mmDiT predicts zero velocity: E|eps - x0|^2 = 1 + E[x0^2], about 2 for normalized latents.
    assert 1.5 < losses[0] < 2.5 and losses[-1] < 0.85 * losses[0]
    events = tag_values(read_events(tmp_path / "tensorboard" / "valid"))
    ((step, grid),) = events["samples"]
    assert step == 12 and grid.image.width == 2 * TILE + 2
    ((_, video),) = events["denoising"]
    frames = list(ImageSequence.Iterator(PILImage.open(io.BytesIO(video.image.encoded_image_string))))
    assert len(frames) == 3 and frames[0].size == (10 * TILE + 2, TILE + 2)
    # The text encoder is frozen: its weights are those it was drawn with.
    task = TASKS[-1]
    trained = final_params(task).params
    # (Drawn inside jit, as the run draws them: eager initialization rounds differently in the last bit.)
    key = jax.random.split(jax.random.key(task.config.seed))[0]
    fresh = eqx.filter_jit(lambda: task.get_model(xax.InitParams(key=key)))()
    assert isinstance(fresh, TextToImage)
    for a, b in zip(
        jax.tree.leaves(trained.text_encoder),
        jax.tree.leaves(eqx.filter(fresh.text_encoder, eqx.is_inexact_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(trained.denoiser.patch_embed.weight - fresh.denoiser.patch_embed.weight).max()) > 1e-4


def test_a_missing_shard_fails_the_launch_naming_it(
    stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    latents = tmp_path / "latents"
    latents.mkdir()
    for path in (stage1 / "latents").iterdir():
        (latents / path.name).write_bytes(path.read_bytes())
    shard = latents / "test-00001-of-00002.array_record"
    shard.unlink()
    with pytest.raises(SystemExit) as info:
        launch(tmp_path / "run", *STAGE2, f"latents={latents}", "max_steps=1")
    assert info.value.code == 2
    assert f"ArrayRecord shard {shard} is missing" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_mistakes_name_the_key(stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for items, message in (
        (("stage=3",), "stage=3 is not one of [1, 2]"),
        (("stage=2",), "stage=2 needs latents=<the folder stage 1 wrote>"),
        (("stage=2", f"latents={tmp_path}"), f"{tmp_path / 'train.json'} does not exist"),
        (("stage=2", f"latents={stage1 / 'latents'}", "max_tokens=3"), "max_tokens=3 is shorter than the caption"),
    ):
        with pytest.raises(SystemExit) as info:
            launch(tmp_path / "run", *items)
        assert info.value.code == 2, items
        assert message in capsys.readouterr().err, items


def test_captions_tokenize_into_a_table_with_the_empty_caption_last() -> None:
    tokenize, vocab_size = word_tokenizer()
    tokens, mask = caption_table(tokenize, 8)
    assert tokens.shape == (num_captions() + 1, 8) and tokens.max() < vocab_size
    assert mask[-1].tolist() == [True] + [False] * 7  # the begin-of-text token alone
    assert (tokens[~mask] == 0).all() and len({tuple(row) for row in tokens}) == len(tokens)


@pytest.mark.slow
def test_a_resumed_stage2_run_equals_a_straight_one_bit_for_bit(stage1: Path, tmp_path: Path) -> None:
    # Stopped after step 5 (mid-epoch of the 256 latents: 8 batches of 32) and resumed from its checkpoint,
    # the run must read the same records in the same order (the cursor over the ArrayRecord shards) and
    # draw the same keys as one that never stopped.
    args = (*STAGE2, f"latents={stage1 / 'latents'}", "checkpoint.every_n_steps=3", "valid_every_n_steps=null")
    straight = launch(tmp_path / "straight", *args, "max_steps=9", task=NineStepSchedule)
    launch(tmp_path / "resumed", *args, "max_steps=5", task=NineStepSchedule)
    resumed = launch(tmp_path / "resumed", *args, "max_steps=9", "resume=auto", task=NineStepSchedule)
    for a, b in zip(jax.tree.leaves(final_params(straight)), jax.tree.leaves(final_params(resumed)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    straight_losses = dict(_train_losses(tmp_path / "straight"))
    assert all(straight_losses[step] == loss for step, loss in _train_losses(tmp_path / "resumed"))


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["dp", "fsdp"])
def test_stage2_trains_on_four_simulated_devices(stage1: Path, tmp_path: Path, plan: str) -> None:
    task = launch(
        tmp_path, *STAGE2, f"latents={stage1 / 'latents'}", "max_steps=6", "valid_every_n_steps=6",
        "log.heavy_every_n_steps=6", "launcher.kind=multi_device", "launcher.num_devices=4", f"parallel.plan={plan}",
    )  # fmt: skip
    losses = [loss for _, loss in _train_losses(tmp_path)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    qkv = final_params(task).params.denoiser.last.image.qkv.weight
    assert qkv.sharding.mesh.devices.size == 4
    spec = tuple(qkv.sharding.spec)
    assert ("fsdp" in str(spec)) == (plan == "fsdp"), spec
    assert "samples" in tag_values(read_events(tmp_path / "tensorboard" / "valid"))


def test_a_local_model_folder_encodes_the_captions(tmp_path: Path) -> None:
    # A GPT-2-style model saved as save_pretrained does, with a word-level tokenizer.json: its hidden
    # states of each caption are those of the model itself, after the model's begin-of-text token.
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted({word for i in range(num_captions()) for word in captions_of([i])[0].split()})
    vocab = {"<|endoftext|>": 0, **{word: i + 1 for i, word in enumerate(words)}}
    model = Transformer(replace(TransformerConfig.gpt2_tiny(), vocab_size=len(vocab) + 3), key=jax.random.key(0))
    save_hf(model, tmp_path, model_type="gpt2")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "bos_token_id": 0}))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokens, mask = caption_table(build_tokenizer(str(tmp_path)), 8)
    seven = num_captions() - 3  # the last template's caption of a seven
    assert captions_of([seven]) == ["seven written by hand"]
    expected = [0, vocab["seven"], vocab["written"], vocab["by"], vocab["hand"]]
    assert tokens[seven][mask[seven]].tolist() == expected
    encoder = build_encoder(str(tmp_path), 16, 8, jax.random.key(1))
    hidden, _ = encoder.hidden_states(jnp.asarray(tokens[seven : seven + 1, :5]))
    reference, _ = model.hidden_states(jnp.asarray([expected]))
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(reference), atol=1e-5)
