"""Text-to-image latent diffusion on MNIST in two stages, the JaxFM way: ``python -m examples.latent_diffusion``.

Stage 1 trains a VAE (``xax.arch.VAE``, 28x28 digits to 4x7x7 latents) with the beta-VAE objective, logging
the reconstruction error, the KL term and a grid of digits over their reconstructions; when it ends, it
encodes the training and test sets (the posterior means) into ArrayRecord shards with a manifest
(``xax.data.write_records``) in ``latents`` (default ``<run dir>/latents``).

Stage 2 trains an mmDiT (``xax.arch.MMDiT``) by flow matching (rectified flow, logit-normal times) on those
latents, read back through Grain's ``ArrayRecordDataSource`` (``xax.data.read_records``), whose position is
the cursor every checkpoint saves. Each image is captioned from its label with a random template ("a
handwritten seven", "the digit seven", ...); a frozen text encoder (``examples.latent_text``) encodes the
captions inside the step. 10% of the captions are dropped to the empty caption, so that sampling can use
classifier-free guidance; samples are decoded by the stage-1 VAE into a grid (one row per digit) and a
video of the denoising. W&B logs offline with ``log.wandb=true``; ``parallel.plan=fsdp`` shards it::

    python -m examples.latent_diffusion stage=1 artifacts.run_dir=runs/vae
    python -m examples.latent_diffusion stage=2 latents=runs/vae/latents   # the VAE: the one that wrote them
    python -m examples.latent_diffusion stage=2 latents=runs/vae/latents vae=runs/vae text_encoder=~/gpt2
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, UInt8
from typing_extensions import override

import xax
from examples.latent_text import build_encoder, build_tokenizer, caption_table, num_captions, template_ids
from examples.mnist_data import NUM_CLASSES, load_mnist
from xax import EMAOptions, LogOptions, PrecisionOptions
from xax.arch import VAE, MMDiT, MMDiTConfig, Transformer, VAEConfig, vae_loss
from xax.arch.diffusion import euler_sample, flow_matching_loss, guided, heun_sample
from xax.checkpoint import read_metadata, resolve_checkpoint, restore_weights
from xax.data import read_manifest, read_records, write_records
from xax.nn import cast_floating

Batch = dict[str, Array]
SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
SPLITS: dict[xax.Phase, str] = {"train": "train", "valid": "test"}  # phase -> MNIST split and records' name


# ---- models ------------------------------------------------------------------------------------


class TextToImage(eqx.Module):
    """The stage-2 model: the mmDiT denoiser and the frozen text encoder (its optimizer updates are zero)."""

    denoiser: MMDiT
    text_encoder: Transformer

    def encode_text(self, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"]) -> Float[Array, "b l d"]:
        """The encoder's last hidden states of the captions, constants to the gradient."""
        hidden, _ = self.text_encoder.hidden_states(tokens, padding_mask=mask)
        return jax.lax.stop_gradient(hidden)

    def velocity(
        self, x: Float[Array, "b c h w"], t: Float[Array, " b"], tokens: Int[Array, "b l"], mask: Bool[Array, "b l"]
    ) -> Float[Array, "b c h w"]:
        """The predicted velocity, in float32, of latents ``x`` at times ``t`` given caption tokens."""
        context = self.encode_text(tokens, mask)
        return jax.vmap(self.denoiser)(x, t, context, mask).astype(jnp.float32)


def to_signed(images: UInt8[Array, "b 28 28"]) -> Float[Array, "b 1 28 28"]:
    """uint8 pixels to float32 in [-1, 1], with a channel axis."""
    return (images.astype(jnp.float32) / 127.5 - 1.0)[:, None]


def to_uint8(images: Float[Array, "b 1 28 28"]) -> UInt8[Array, "b 28 28"]:
    return jnp.round((jnp.clip(images[:, 0].astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


@eqx.filter_jit
def reconstruct(vae: VAE, images: UInt8[Array, "b 28 28"]) -> UInt8[Array, "b 28 28"]:
    """Digits through the VAE: decoded posterior means."""
    dtype = vae.dec_out.weight.dtype
    return to_uint8(jax.vmap(lambda x: vae.decode(vae.encode(x)[0]))(to_signed(images).astype(dtype)))


@eqx.filter_jit
def encode_means(vae: VAE, images: UInt8[Array, "b 28 28"]) -> Float[Array, "b l h w"]:
    """The posterior means of digits, in float32."""
    return jax.vmap(lambda x: vae.encode(x)[0])(to_signed(images)).astype(jnp.float32)


@eqx.filter_jit
def generate(
    model: TextToImage,
    vae: VAE,
    tokens: Int[Array, "n l"],
    mask: Bool[Array, "n l"],
    ids: Int[Array, " b"],
    key: PRNGKeyArray,
    guidance: Float[Array, ""],
    shift_scale: Float[Array, "2"],
    num_steps: int,
    sampler: str,
    keep: int,
) -> tuple[UInt8[Array, "b 28 28"], UInt8[Array, "s k 28 28"]]:
    """Samples of caption ids with classifier-free guidance, decoded by the VAE.

    Args:
        model: The trained model, in its compute dtype.
        vae: The stage-1 VAE.
        tokens: The caption table's token ids (every caption, the empty one last).
        mask: The caption table's masks.
        ids: The caption id of each sample.
        key: Draws the starting noise.
        guidance: ``s`` of ``v_u + s (v_c - v_u)``; 1 is the conditional model alone.
        shift_scale: The latents' normalization ``z = (latent - shift) * scale``.
        num_steps: Integration steps from noise (t = 1) to data (t = 0).
        sampler: "euler" or "heun".
        keep: Every ``keep``-th sample is also returned after each step (the video's frames).

    Returns:
        The samples as uint8 images, and the kept samples after every step.
    """
    config = model.denoiser.config
    shape = (ids.shape[0], config.in_channels, config.input_size, config.input_size)
    noise = jax.random.normal(key, shape, jnp.float32)

    def net(x: Array, t: Array, caption_ids: Array) -> Array:
        dtype = model.denoiser.context_embed.weight.dtype
        return model.velocity(x.astype(dtype), t, tokens[caption_ids], mask[caption_ids])

    velocity = guided(net, ids, num_captions(), guidance)
    path = SAMPLERS[sampler](velocity, noise, num_steps, trajectory=True)  # (S, B, C, h, w)
    shift, scale = shift_scale[0], shift_scale[1]
    decode = jax.vmap(lambda z: vae.decode((z / scale + shift).astype(vae.dec_out.weight.dtype)))
    frames = jax.vmap(lambda zs: to_uint8(decode(zs)))(path[:, ::keep])
    return to_uint8(decode(path[-1])), frames


def grid_metric(images: np.ndarray, per_row: int, labels: tuple[str, ...] | None = None) -> xax.Images:
    return xax.Images(images, labels=labels, max_per_row=per_row)


# ---- the task ----------------------------------------------------------------------------------


@dataclass
class Config(xax.Config):
    stage: int = xax.field(1, help="1: train the VAE and encode MNIST to latents; 2: train the mmDiT on them")
    latents: str | None = xax.field(
        None, help="The latents' folder: stage 1 writes it (None: <run dir>/latents), stage 2 reads it (required)"
    )
    vae: str | None = xax.field(
        None, help="Stage 2: the VAE checkpoint (run dir or step) decoding samples; None: the one that wrote latents"
    )
    autoencoder: VAEConfig = xax.field(
        VAEConfig(channel_mults=(1, 2, 2)),
        help="The VAE: three levels take 28x28 digits to 4x7x7 latents (4x fewer numbers than pixels)",
    )
    kl_weight: float = xax.field(
        1e-3, help="beta of the KL term: small, so latents stay nearly deterministic (Rombach et al. 2022)"
    )
    latent_shards: int = xax.field(4, help="ArrayRecord shards per split")
    mmdit: MMDiTConfig = xax.field(
        MMDiTConfig(input_size=7, patch_size=1, in_channels=4, context_dim=64, d_model=256, num_layers=6, num_heads=8),
        help="The mmDiT: 49 latent tokens (patch 1 over 7x7) and 256 wide; context_dim follows the text encoder",
    )
    text_encoder: str | None = xax.field(
        None, help="A save_pretrained folder (GPT-2, Llama, Qwen2, Mistral) to encode captions; None: a small one"
    )
    text_width: int = xax.field(64, help="Width of the default text encoder (two layers, four heads)")
    max_tokens: int = xax.field(8, help="Caption tokens, padded: the longest default caption has 7 with its BOS")
    caption_drop_prob: float = xax.field(0.1, help="Captions dropped to the empty one in training (Ho & Salimans)")
    time_sampler: str = xax.field("logit_normal", help="Flow-matching times: logit_normal (SD3) or uniform")
    sampler: str = xax.field("euler", help="ODE sampler: euler, or heun (two evaluations per step)")
    sampling_steps: int = xax.field(32, help="Integration steps per sample")
    guidance_scale: float = xax.field(2.0, help="Guidance s of v_u + s (v_c - v_u); 1: none")
    num_per_class: int = xax.field(8, help="Samples per digit in the logged grid (one row per digit)")
    learning_rate: float = xax.field(5e-4, help="Peak learning rate of the warmup-cosine schedule")
    warmup_steps: int = xax.field(500, help="Linear warmup steps before the cosine decay")
    weight_decay: float = xax.field(1e-4, help="AdamW weight decay (of the trained weights only)")
    batch_size: int = xax.field(128, help="Images (stage 1) or latents (stage 2) per optimizer step")
    max_steps: int | None = xax.field(10_000, help="Optimizer steps of the stage")
    valid_every_n_steps: int | None = xax.field(2000, help="Validate on the test split every N steps")
    max_grad_norm: float | None = xax.field(1.0, help="Clip gradients to this global norm, against rare spikes")
    precision: PrecisionOptions = xax.field(
        PrecisionOptions(compute_dtype="bfloat16"), help="Mixed precision: bfloat16 compute, made for GPUs"
    )
    ema: EMAOptions = xax.field(EMAOptions(decay=0.999), help="Moving average of the weights, used for sampling")
    log: LogOptions = xax.field(
        LogOptions(heavy_every_n_steps=2000, heavy_every_n_seconds=None),
        help="Logging options (grids every 2,000 steps and at the end)",
    )


class LatentDiffusion(xax.Task[Config]):
    """Stage 1 (VAE) or stage 2 (text-conditioned mmDiT on the VAE's latents), per ``config.stage``."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._captions: tuple[np.ndarray, np.ndarray] | None = None
        self._vae: VAE | None = None

    @override
    def validate_config(self) -> None:
        config = self.config
        for key, value, allowed in (
            ("stage", config.stage, [1, 2]),
            ("sampler", config.sampler, sorted(SAMPLERS)),
            ("time_sampler", config.time_sampler, ["logit_normal", "uniform"]),
        ):
            if value not in allowed:
                raise xax.ConfigError(f"{key}={value!r} is not one of {allowed}")
        if not 0.0 <= config.caption_drop_prob < 1.0:
            raise xax.ConfigError(f"caption_drop_prob={config.caption_drop_prob} must lie in [0, 1)")
        for key in ("num_per_class", "sampling_steps", "latent_shards", "max_tokens", "text_width"):
            if getattr(config, key) < 1:
                raise xax.ConfigError(f"{key}={getattr(config, key)} must be at least 1")
        if config.stage == 2:
            if config.latents is None:
                raise xax.ConfigError("stage=2 needs latents=<the folder stage 1 wrote> (its run dir's latents)")
            for name in SPLITS.values():
                read_manifest(config.latents, name)
            latent_shape = tuple(read_manifest(config.latents, "train")["metadata"]["latent_shape"])
            expected = (config.mmdit.in_channels, config.mmdit.input_size, config.mmdit.input_size)
            if latent_shape != expected:
                raise xax.ConfigError(
                    f"the latents in {config.latents} are {latent_shape}, but mmdit.in_channels/input_size give "
                    f"{expected}; match them"
                )
            self.captions()  # the tokenizer exists, and every caption fits max_tokens
        super().validate_config()

    # ---- the text encoder and the latents -------------------------------------------------------

    def captions(self) -> tuple[np.ndarray, np.ndarray]:
        """The caption table: token ids and masks of every caption id (the empty caption last)."""
        if self._captions is None:
            tokenize = build_tokenizer(self.config.text_encoder)
            self._captions = caption_table(tokenize, self.config.max_tokens)
        return self._captions

    def latents_dir(self) -> Path:
        if self.config.latents is not None:
            return Path(self.config.latents).expanduser().absolute()
        return self.run_dir / "latents"

    def latent_metadata(self) -> dict[str, Any]:
        return read_manifest(self.latents_dir(), "train")["metadata"]

    def shift_scale(self) -> Float[Array, "2"]:
        meta = self.latent_metadata()
        return jnp.asarray([meta["shift"], meta["scale"]], jnp.float32)

    def stage1_vae(self) -> VAE:
        """The stage-1 VAE for decoding samples: from ``vae``, else from the run that wrote the latents."""
        if self._vae is None:
            meta = self.latent_metadata()
            path = Path(self.config.vae).expanduser() if self.config.vae is not None else Path(meta["vae_checkpoint"])
            directory, steps = resolve_checkpoint(path)
            saved = read_metadata(directory, steps[0])["config"]["autoencoder"]
            values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
            config = VAEConfig(**values)
            vae = restore_weights(VAE(config, key=jax.random.key(0)), directory, steps[0])
            arrays, static = eqx.partition(eqx.nn.inference_mode(cast_floating(vae, self.compute_dtype)), eqx.is_array)
            # On every device of the mesh, beside the model it decodes for.
            self._vae = eqx.combine(jax.device_put(arrays, self.replicated_sharding()), static)
        return self._vae

    # ---- the model and the loss -----------------------------------------------------------------

    @override
    def get_model(self, params: xax.InitParams) -> VAE | TextToImage:
        config = self.config
        if config.stage == 1:
            return VAE(config.autoencoder, key=params.key)
        text_key, mmdit_key = jax.random.split(params.key)
        encoder = build_encoder(config.text_encoder, config.text_width, config.max_tokens, text_key)
        mmdit = replace(config.mmdit, context_dim=encoder.config.d_model)
        return TextToImage(MMDiT(mmdit, key=mmdit_key), encoder)

    @override
    def get_optimizer(self) -> optax.GradientTransformation:
        config = self.config
        total = self.expected_total_steps() or 10_000
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, min(config.warmup_steps, total // 2), total
        )
        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=config.weight_decay)
        if config.stage == 1:
            return adamw

        def labels(params: Any) -> Any:
            """ "frozen" for the text encoder's weights, "trained" for the rest."""
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if jax.tree_util.keystr(path).startswith(".text_encoder") else "trained",
                params,
            )

        return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)

    @override
    def compute_loss_and_metrics(
        self, model: VAE | TextToImage, batch: Batch, state: xax.State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, xax.Metric]]:
        if isinstance(model, VAE):
            return self.vae_loss(model, batch, key)
        return self.flow_loss(model, batch, state, key)

    def vae_loss(self, model: VAE, batch: Batch, key: PRNGKeyArray) -> tuple[Array, dict[str, xax.Metric]]:
        x = to_signed(batch["image"])
        keys = jax.random.split(key, x.shape[0])
        recon, mean, logvar = jax.vmap(model)(x.astype(self.compute_dtype), keys)
        loss, recon_error, kl = vae_loss(
            recon.astype(jnp.float32), x, mean.astype(jnp.float32), logvar.astype(jnp.float32), self.config.kl_weight
        )
        return loss, {"reconstruction": xax.Scalar(recon_error), "kl": xax.Scalar(kl)}

    def flow_loss(
        self, model: TextToImage, batch: Batch, state: xax.State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, xax.Metric]]:
        template_key, drop_key, loss_key = jax.random.split(key, 3)
        tokens, mask = self.captions()
        ids = template_ids(template_key, batch["label"].astype(jnp.int32))
        # Validation scores the conditional model alone; training also teaches the unconditional one.
        drop = self.config.caption_drop_prob if state.phase == "train" else 0.0
        ids = jnp.where(jax.random.bernoulli(drop_key, drop, ids.shape), num_captions(), ids)
        tokens, mask = jnp.asarray(tokens)[ids], jnp.asarray(mask)[ids]
        shift, scale = self.shift_scale()
        x0 = (batch["latent"].astype(jnp.float32) - shift) * scale
        dtype = self.compute_dtype
        loss = flow_matching_loss(
            lambda x, t: model.velocity(x.astype(dtype), t, tokens, mask), x0, loss_key, self.config.time_sampler
        )
        return loss, {}

    # ---- media ----------------------------------------------------------------------------------

    @override
    def log_media(self, model: VAE | TextToImage, batch: Batch, state: xax.State) -> dict[str, xax.Metric]:
        if isinstance(model, VAE):
            count = min(8, batch["image"].shape[0])
            originals = np.asarray(batch["image"][:count])
            recon = np.asarray(reconstruct(model, batch["image"][:count]))
            # The digits on the first row, their reconstructions under them.
            return {"reconstructions": grid_metric(np.concatenate([originals, recon]), count)}
        grid, video = self.samples(model)
        return {"samples": grid, "denoising": video}

    def samples(
        self, model: TextToImage, ids: np.ndarray | None = None, key: PRNGKeyArray | None = None
    ) -> tuple[xax.Images, xax.Video]:
        """A grid of ``num_per_class`` samples per digit (the first template's caption, one row per digit)
        and a video of the first sample of each digit through the sampling steps."""
        config = self.config
        per = config.num_per_class
        if ids is None:
            ids = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per)
        key = jax.random.fold_in(jax.random.key(config.seed), 3) if key is None else key
        images, frames = self.sample(model, ids, key, config.guidance_scale, keep=per)
        labels = tuple(str(i // per) if i % per == 0 else "" for i in range(len(ids)))
        tiles = np.stack([xax.Images(frame, max_per_row=NUM_CLASSES).to_log().pixels for frame in frames])
        return grid_metric(images, per, labels), xax.Video(tiles, fps=max(1, config.sampling_steps // 4))

    def sample(
        self, model: TextToImage, ids: np.ndarray, key: PRNGKeyArray, guidance: float, keep: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 samples of caption ids, and every ``keep``-th one after each step."""
        tokens, mask = self.captions()
        images, frames = generate(
            model,
            self.stage1_vae(),
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(ids, jnp.int32),
            key,
            jnp.asarray(guidance, jnp.float32),
            self.shift_scale(),
            self.config.sampling_steps,
            self.config.sampler,
            keep,
        )
        return np.asarray(images), np.asarray(frames)

    # ---- data -----------------------------------------------------------------------------------

    @override
    def batch_columns(self) -> tuple[str, ...]:
        return ("image", "label") if self.config.stage == 1 else ("latent", "label")

    @override
    def get_dataset(self, phase: xax.Phase) -> Any:
        if self.config.stage == 1:
            return load_mnist("train" if phase == "train" else "test")
        dataset: grain.MapDataset = read_records(self.latents_dir(), SPLITS[phase])
        return dataset

    @override
    def run(self) -> xax.State:
        state = super().run()
        if self.config.stage == 1 and jax.process_index() == 0:
            path = self.write_latents()
            print(f"wrote the latents to {path}")
        return state

    def write_latents(self, chunk: int = 256) -> Path:
        """Encodes the digits of both phases (``get_dataset``) with the final VAE weights (the EMA when kept)
        into ArrayRecord shards, with the latents' statistics and the VAE's checkpoint in the manifest."""
        directory, steps = resolve_checkpoint(self.run_dir)
        vae = restore_weights(VAE(self.config.autoencoder, key=jax.random.key(0)), directory, steps[0])
        vae = eqx.nn.inference_mode(vae)
        out = self.latents_dir()
        means: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for phase, name in SPLITS.items():
            data = self.get_dataset(phase).with_format("numpy")[:]
            images = np.asarray(data["image"])
            # Whole chunks (the last one padded), so that one compilation encodes everything.
            padded = np.concatenate([images, np.zeros((-len(images) % chunk, *images.shape[1:]), images.dtype)])
            encoded = [
                np.asarray(encode_means(vae, jnp.asarray(padded[i : i + chunk]))) for i in range(0, len(padded), chunk)
            ]
            means[name] = np.concatenate(encoded)[: len(images)]
            labels[name] = np.asarray(data["label"], np.int32)
        # Normalized by the training latents' statistics, so that the flow starts from unit-variance data.
        shift, std = float(means["train"].mean()), float(means["train"].std())
        metadata = {
            "shift": shift,
            "scale": 1.0 / std,
            "latent_shape": list(means["train"].shape[1:]),
            "vae_checkpoint": str(directory / str(steps[0])),
            "autoencoder": asdict(self.config.autoencoder),
        }
        for name in SPLITS.values():
            columns = {
                "latent": means[name],
                "label": labels[name],
                "index": np.arange(len(labels[name]), dtype=np.int64),
            }
            write_records(out, name, columns, num_shards=self.config.latent_shards, metadata=metadata)
        return out


if __name__ == "__main__":
    LatentDiffusion.launch(Config())
