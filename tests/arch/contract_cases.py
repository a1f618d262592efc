"""Contract cases of the model families other than the transformer: SSM, DiT, mmDiT, UNet, VAE.

The denoisers and the VAE start with zero-initialized branches (adaLN-Zero, zero output convolutions),
where most gradients are exactly zero, so their cases redraw every weight from the model's key. Their
dtype policy is "compute in the dtype of the weights": the low-precision model is the same model with
its floating leaves cast to bfloat16, and its output is bfloat16. The SSM keeps float32 weights and
computes in ``compute_dtype``, with float32 logits, as the transformer does.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from tests.arch.contracts import ContractCase, Equivalence
from xax.arch.dit import DiT, dit_config
from xax.arch.mmdit import MMDiT, MMDiTConfig
from xax.arch.ssm import SSMConfig, SSMLanguageModel
from xax.arch.unet import UNet, UNetConfig
from xax.arch.vae import VAE, VAEConfig, vae_loss
from xax.nn.losses import cross_entropy

M = TypeVar("M")
BATCH, SEQ, VOCAB = 2, 8, 13
NUM_CLASSES = 3


def redrawn(model: M, key: jax.Array, scale: float = 0.2) -> M:
    """Every floating leaf drawn anew from N(0, scale^2), so zero-initialized branches are active."""
    leaves, treedef = jax.tree.flatten(model)
    keys = iter(jax.random.split(key, len(leaves)))
    new = [scale * jax.random.normal(next(keys), x.shape, x.dtype) if eqx.is_inexact_array(x) else x for x in leaves]
    return jax.tree.unflatten(treedef, new)


def in_bfloat16(model: M) -> M:
    """The model with every floating leaf cast to bfloat16."""
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model)


def weight_dtype(model: Any) -> Any:
    return jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))[0].dtype


# ---- SSM language model ----------------------------------------------------------------------------


def _ssm_logits(model: SSMLanguageModel, inputs: tuple) -> jax.Array:
    return model(inputs[0])


def _ssm_loss(model: SSMLanguageModel, inputs: tuple) -> jax.Array:
    (tokens,) = inputs
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])


def _ssm_equivalences(config: SSMConfig) -> Callable[[], list[Equivalence]]:
    def build() -> list[Equivalence]:
        model = SSMLanguageModel(config, key=jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
        full = eqx.filter_jit(_ssm_logits)(model, (tokens,))
        step = eqx.filter_jit(SSMLanguageModel.decode_step)

        def decoded(cache: tuple, toks: jax.Array) -> list[jax.Array]:
            logits = []
            for i in range(toks.shape[1]):
                out, cache = step(model, toks[:, i], cache)
                logits.append(out)
            return logits

        def recurrent() -> jax.Array:
            return jnp.stack(decoded(model.init_cache(BATCH), tokens), axis=1)

        def prefilled() -> jax.Array:
            prefix, cache = eqx.filter_jit(SSMLanguageModel.prefill)(model, tokens[:, :3], model.init_cache(BATCH))
            return jnp.concatenate([prefix, jnp.stack(decoded(cache, tokens[:, 3:]), axis=1)], axis=1)

        return [
            Equivalence("recurrent equals parallel", lambda: (full, recurrent()), atol=1e-5, rtol=1e-5),
            Equivalence("prefill then recurrent equals parallel", lambda: (full, prefilled()), atol=1e-5, rtol=1e-5),
        ]

    return build


def ssm_cases() -> list[ContractCase]:
    """The selective (Mamba) and diagonal (S4D, with an MLP and untied embeddings) language models."""
    configs = {
        "selective": SSMConfig(vocab_size=VOCAB, d_model=8, num_layers=2, layer="selective", d_state=4),
        "diagonal": SSMConfig(
            vocab_size=VOCAB, d_model=8, num_layers=2, layer="diagonal", d_state=4, mlp_ratio=2, tie_embeddings=False
        ),
    }
    return [
        ContractCase(
            name=f"ssm-{name}",
            make_model=lambda key, c=config: SSMLanguageModel(c, key=key),
            make_inputs=lambda key: (jax.random.randint(key, (BATCH, SEQ), 0, VOCAB),),
            apply=_ssm_logits,
            loss=_ssm_loss,
            make_low_precision_model=lambda key, c=config: SSMLanguageModel(
                replace(c, compute_dtype="bfloat16"), key=key
            ),
            output_dtype=jnp.float32,
            param_dtype=jnp.float32,
            equivalences=_ssm_equivalences(config),
        )
        for name, config in configs.items()
    ]


# ---- denoisers: DiT, UNet, mmDiT -----------------------------------------------------------------------


def _image_inputs(channels: int, size: int) -> Callable[[jax.Array], tuple]:
    def make(key: jax.Array) -> tuple:
        kx, kt, ky = jax.random.split(key, 3)
        x = jax.random.normal(kx, (BATCH, channels, size, size))
        return x, jax.random.uniform(kt, (BATCH,)), jax.random.randint(ky, (BATCH,), 0, NUM_CLASSES + 1)

    return make


def _denoise(model: Any, inputs: tuple) -> jax.Array:
    x, t, y = inputs
    return jax.vmap(model)(x.astype(weight_dtype(model)), t, y)


def _denoise_loss(model: Any, inputs: tuple) -> jax.Array:
    return jnp.mean((_denoise(model, inputs).astype(jnp.float32) - inputs[0]) ** 2)


def _denoiser_equivalences(
    build: Callable[..., Any], config: Any, scans: bool, make_inputs: Callable[[jax.Array], tuple]
) -> Callable[[], list[Equivalence]]:
    """Remat against none (loss and gradients), and for a DiT the scanned stack against the loop."""

    def pairs() -> list[Equivalence]:
        inputs = make_inputs(jax.random.key(1))

        def model(**changes: Any) -> Any:
            return redrawn(build(replace(config, **changes), key=jax.random.key(0)), jax.random.key(0))

        loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_denoise_loss))
        forward = eqx.filter_jit(_denoise)
        found = [
            Equivalence(
                "remat 'full' equals none",
                lambda: (loss_and_grad(model(), inputs), loss_and_grad(model(remat="full"), inputs)),
                atol=1e-6,
            )
        ]
        if scans:
            found.append(
                Equivalence(
                    "loop equals scan",
                    lambda: (forward(model(), inputs), forward(model(scan_layers=True), inputs)),
                    atol=1e-5,
                )
            )
        return found

    return pairs


def _denoiser_case(name: str, build: Callable[..., Any], config: Any, channels: int, size: int, scans: bool) -> Any:
    make_model = lambda key: redrawn(build(config, key=key), key)  # noqa: E731
    make_inputs = _image_inputs(channels, size)
    return ContractCase(
        name=name,
        make_model=make_model,
        make_inputs=make_inputs,
        apply=_denoise,
        loss=_denoise_loss,
        make_low_precision_model=lambda key: in_bfloat16(make_model(key)),
        output_dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        equivalences=_denoiser_equivalences(build, config, scans, make_inputs),
    )


# The whole mmDiT: 2 latent channels of 8x8, context of 5 tokens 12 wide, the last one padding.
MM_CHANNELS, MM_SIZE, MM_CONTEXT, MM_CONTEXT_DIM = 2, 8, 5, 12


def _mmdit_inputs(key: jax.Array) -> tuple:
    kx, kt, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (BATCH, MM_CHANNELS, MM_SIZE, MM_SIZE))
    context = jax.random.normal(kc, (BATCH, MM_CONTEXT, MM_CONTEXT_DIM))
    mask = jnp.arange(MM_CONTEXT)[None, :].repeat(BATCH, axis=0) < MM_CONTEXT - 1
    return x, jax.random.uniform(kt, (BATCH,)), context, mask


def _mmdit_denoise(model: MMDiT, inputs: tuple) -> jax.Array:
    x, t, context, mask = inputs
    dtype = weight_dtype(model)
    return jax.vmap(model)(x.astype(dtype), t, context.astype(dtype), mask)


def _mmdit_loss(model: MMDiT, inputs: tuple) -> jax.Array:
    return jnp.mean((_mmdit_denoise(model, inputs).astype(jnp.float32) - inputs[0]) ** 2)


def _mmdit_equivalences(config: MMDiTConfig) -> Callable[[], list[Equivalence]]:
    """Remat against none, the scanned stack against the loop, and masked padding against no padding."""

    def pairs() -> list[Equivalence]:
        inputs = _mmdit_inputs(jax.random.key(1))

        def model(**changes: Any) -> MMDiT:
            return redrawn(MMDiT(replace(config, **changes), key=jax.random.key(0)), jax.random.key(0))

        loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_mmdit_loss))
        forward = eqx.filter_jit(_mmdit_denoise)

        def unpadded() -> tuple:
            x, t, context, mask = inputs
            kept = MM_CONTEXT - 1
            return forward(model(), inputs), forward(model(), (x, t, context[:, :kept], mask[:, :kept]))

        return [
            Equivalence(
                "remat 'full' equals none",
                lambda: (loss_and_grad(model(), inputs), loss_and_grad(model(remat="full"), inputs)),
                atol=1e-6,
            ),
            Equivalence(
                "loop equals scan",
                lambda: (forward(model(), inputs), forward(model(scan_layers=True), inputs)),
                atol=1e-5,
            ),
            Equivalence("masked padding equals no padding", unpadded, atol=1e-5),
        ]

    return pairs


def mmdit_config() -> MMDiTConfig:
    """A two-block mmDiT (one full block and the last) on 8x8x2 inputs with patches of 2."""
    return MMDiTConfig(
        input_size=MM_SIZE,
        patch_size=2,
        in_channels=MM_CHANNELS,
        context_dim=MM_CONTEXT_DIM,
        d_model=16,
        num_layers=2,
        num_heads=2,
        frequency_dim=8,
    )


def _mmdit_model_case() -> ContractCase:
    config = mmdit_config()
    make_model = lambda key: redrawn(MMDiT(config, key=key), key)  # noqa: E731
    return ContractCase(
        name="mmdit",
        make_model=make_model,
        make_inputs=_mmdit_inputs,
        apply=_mmdit_denoise,
        loss=_mmdit_loss,
        make_low_precision_model=lambda key: in_bfloat16(make_model(key)),
        output_dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        equivalences=_mmdit_equivalences(config),
    )


def denoiser_cases() -> list[ContractCase]:
    """A tiny class-conditional DiT and UNet, and a text-conditioned mmDiT (made of mmDiT blocks)."""
    dit = dit_config(
        "DiT-S/2", input_size=8, in_channels=2, d_model=16, num_layers=2, num_heads=2, num_classes=NUM_CLASSES
    )
    dit = replace(dit, frequency_dim=8)
    unet = UNetConfig(
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=4,
        num_classes=NUM_CLASSES,
    )
    return [
        _denoiser_case("dit", DiT, dit, channels=2, size=8, scans=True),
        _denoiser_case("unet", UNet, unet, channels=1, size=8, scans=False),
        _mmdit_model_case(),
    ]


# ---- VAE -----------------------------------------------------------------------------------------------


def _reconstruct(model: VAE, inputs: tuple) -> jax.Array:
    """The decoded posterior mean."""
    x, _ = inputs
    return jax.vmap(lambda image: model.decode(model.encode(image)[0]))(x.astype(weight_dtype(model)))


def _vae_loss(model: VAE, inputs: tuple) -> jax.Array:
    x, key = inputs
    dtype = weight_dtype(model)
    keys = jax.random.split(key, x.shape[0])
    reconstruction, mean, logvar = jax.vmap(model)(x.astype(dtype), keys)
    return vae_loss(reconstruction.astype(jnp.float32), x, mean.astype(jnp.float32), logvar.astype(jnp.float32))[0]


def vae_cases() -> list[ContractCase]:
    """A two-level VAE on 8x8 single-channel images."""
    config = VAEConfig(base_channels=8, norm_groups=4)
    make_model = lambda key: redrawn(VAE(config, key=key), key)  # noqa: E731
    return [
        ContractCase(
            name="vae",
            make_model=make_model,
            make_inputs=lambda key: (jax.random.normal(key, (BATCH, 1, 8, 8)), jax.random.key(3)),
            apply=_reconstruct,
            loss=_vae_loss,
            make_low_precision_model=lambda key: in_bfloat16(make_model(key)),
            output_dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
        )
    ]
