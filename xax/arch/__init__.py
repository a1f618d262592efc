"""Whole models, each with a config in one convention (``xax.arch.config``) and its own sharding rules.

- ``Transformer`` (GPT-2 and Llama/Qwen/Mistral styles) and ``generate`` (KV-cached sampling);
- ``SSMLanguageModel`` (S4D/S5-style diagonal or Mamba-style selective layers);
- ``DiT``, the text-conditioned ``MMDiT`` of Stable Diffusion 3 (and its ``MMDiTBlock``), ``UNet``, ``VAE``;
- ``xax.arch.diffusion``: schedules, samplers, flow matching and guidance for the denoisers.

``SHARDING_RULES`` joins the rules each model declares beside it: the default table of
``xax.parallel.rules`` (first match wins).
"""

from xax.arch import diffusion as diffusion
from xax.arch.config import REMAT_POLICIES as REMAT_POLICIES
from xax.arch.config import ModelConfigError as ModelConfigError
from xax.arch.config import ShardingRules as ShardingRules
from xax.arch.dit import DIT_SIZES as DIT_SIZES
from xax.arch.dit import SHARDING_RULES as _DIT_RULES
from xax.arch.dit import DiT as DiT
from xax.arch.dit import DiTBlock as DiTBlock
from xax.arch.dit import DiTConfig as DiTConfig
from xax.arch.dit import dit_config as dit_config
from xax.arch.dit import num_tokens as num_tokens
from xax.arch.dit import patchify as patchify
from xax.arch.dit import unpatchify as unpatchify
from xax.arch.generate import GenerateOutput as GenerateOutput
from xax.arch.generate import SamplingConfig as SamplingConfig
from xax.arch.generate import filter_logits as filter_logits
from xax.arch.generate import generate as generate
from xax.arch.generate import sample_token as sample_token
from xax.arch.mmdit import SHARDING_RULES as _MMDIT_RULES
from xax.arch.mmdit import MMDiT as MMDiT
from xax.arch.mmdit import MMDiTBlock as MMDiTBlock
from xax.arch.mmdit import MMDiTConfig as MMDiTConfig
from xax.arch.ssm import SHARDING_RULES as _SSM_RULES
from xax.arch.ssm import SSMCache as SSMCache
from xax.arch.ssm import SSMConfig as SSMConfig
from xax.arch.ssm import SSMLanguageModel as SSMLanguageModel
from xax.arch.transformer import SHARDING_RULES as _TRANSFORMER_RULES
from xax.arch.transformer import Transformer as Transformer
from xax.arch.transformer import TransformerBlock as TransformerBlock
from xax.arch.transformer import TransformerCache as TransformerCache
from xax.arch.transformer import TransformerConfig as TransformerConfig
from xax.arch.unet import SHARDING_RULES as _UNET_RULES
from xax.arch.unet import UNet as UNet
from xax.arch.unet import UNetConfig as UNetConfig
from xax.arch.unet import count_params as count_params
from xax.arch.vae import SHARDING_RULES as _VAE_RULES
from xax.arch.vae import VAE as VAE
from xax.arch.vae import VAEConfig as VAEConfig
from xax.arch.vae import gaussian_kl as gaussian_kl
from xax.arch.vae import reparameterize as reparameterize
from xax.arch.vae import vae_loss as vae_loss

# Every model's rules, the transformer's first; a rule two models share appears once.
SHARDING_RULES: ShardingRules = tuple(
    dict.fromkeys((*_TRANSFORMER_RULES, *_SSM_RULES, *_DIT_RULES, *_MMDIT_RULES, *_UNET_RULES, *_VAE_RULES))
)
