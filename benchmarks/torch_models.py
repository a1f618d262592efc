"""PyTorch references for the throughput benchmarks: GPT-2 (nanoGPT's layout) and DiT (adaLN-Zero).

Both follow xax's parameterization, so parameter counts agree and weights copy over by name
(``tests/benchmarks/test_torch_models.py`` checks both, and the logits, against xax's models):

- ``GPT`` is xax's ``Transformer`` with ``TransformerConfig.gpt2_small()``'s options: learned
  positions, pre-norm LayerNorm (eps 1e-5), a fused q/k/v projection with biases, a tanh-GELU MLP
  four times as wide, and the output projection tied to the token embedding.
- ``DiT`` is xax's ``DiT`` (Peebles & Xie 2023): a patch-embedding convolution, a fixed 2-D sine-cosine
  position table, sinusoidal timestep features through a two-layer SiLU MLP plus a class embedding
  with one extra (null) label, blocks modulated by adaLN-Zero, and a modulated final projection.

Attention is ``F.scaled_dot_product_attention``, which dispatches to a fused (flash) kernel on GPU.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ---- GPT-2 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTShape:
    """The sizes of a GPT-2-style model; defaults are GPT-2 small (124M parameters).

    Attributes:
        vocab_size: 50257, GPT-2's byte-level BPE vocabulary (not padded, so counts match xax's).
        max_seq_len: 1024, GPT-2's context and the size of the learned position table.
        d_model: 768, GPT-2 small's width.
        num_layers: 12, GPT-2 small's depth.
        num_heads: 12, giving 64-wide heads.
        norm_eps: 1e-5, GPT-2's LayerNorm epsilon.
    """

    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    norm_eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.num_heads = shape.num_heads
        self.c_attn = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.c_proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.c_attn(x).split(dim, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(batch, seq, self.num_heads, dim // self.num_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, dim))


class GPTMLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.c_fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.c_proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPTBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.d_model, eps=shape.norm_eps)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.d_model, eps=shape.norm_eps)
        self.mlp = GPTMLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTBody(nn.Module):
    """The embeddings, blocks and final norm (nanoGPT's ``transformer``)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.max_seq_len, shape.d_model)
        self.h = nn.ModuleList(GPTBlock(shape) for _ in range(shape.num_layers))
        self.ln_f = nn.LayerNorm(shape.d_model, eps=shape.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, D) of token ids (B, T)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)  # (B, T, D)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT(nn.Module):
    """GPT-2 with a tied output projection; ``forward`` gives logits, ``loss`` the mean cross-entropy."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.transformer = GPTBody(shape)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialization, as xax's: N(0, 0.02), residual output projections scaled by
        1 / sqrt(2 * num_layers), the position table N(0, 0.01), zero biases."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "ln_" in name:
                nn.init.ones_(param)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.shape.num_layers))
            else:
                nn.init.normal_(param, std=0.01 if "wpe" in name else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of token ids (B, T)."""
        return self.lm_head(self.transformer(tokens))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over windows of ``T + 1`` tokens (B, T + 1), in float32."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


# ---- DiT -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTShape:
    """The sizes of a DiT; defaults are DiT-B/2 on 32x32x4 latents, as xax's ``dit_config("DiT-B/2")``.

    Attributes:
        input_size: 32, the latent side of a 256x256 image through an 8x-downsampling VAE.
        patch_size: 2, giving 256 tokens.
        in_channels: 4, Stable Diffusion VAE latents; the output has as many (eps prediction).
        hidden_dim: 768 (DiT-B).
        depth: 12 (DiT-B).
        num_heads: 12 (DiT-B), 64 channels each.
        mlp_ratio: 4.0, as ViT.
        num_classes: 1000 ImageNet classes, plus one null label for classifier-free guidance.
        frequency_dim: 256 sinusoidal timestep features, DiT's value.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    frequency_dim: int = 256


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """The fixed 2-D position table (H * W, dim): token ``r * W + c`` gets ``[1d(c), 1d(r)]`` with
    ``1d(p) = [sin(p w_i), cos(p w_i)]`` and ``w_i = 10000^(-i / (dim / 4))`` (MAE, DiT)."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim / 4,)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )

    def one_d(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (H * W, dim / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[cos(1000 t f_i), sin(1000 t f_i)]`` with ``f_i = max_period^(-i / (dim / 2))``, for t in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, frequency_dim: int, dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear1 = nn.Linear(frequency_dim, dim)
        self.linear2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(timestep_features(t, self.frequency_dim))))


class DiTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class DiTBlock(nn.Module):
    """``x += g1 attn(mod(LN(x), s1, c1)); x += g2 mlp(mod(LN(x), s2, c2))``, modulations from ``SiLU(c)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.modulation = nn.Linear(dim, 6 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = DiTMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)  # 6 x (B, D)
        qkv = self.qkv(_modulate(_layer_norm(x), shift1, scale1))  # (B, T, 3D)
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, dim // self.num_heads).permute(
            2, 0, 3, 1, 4
        )  # (B, nh, T, hs)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, seq, dim)
        x = x + gate1[:, None] * self.proj(attended)
        return x + gate2[:, None] * self.mlp(_modulate(_layer_norm(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(_modulate(_layer_norm(x), shift, scale))


class DiT(nn.Module):
    """The DiT denoiser; ``forward(x (B, C, H, W), t (B,) in [0, 1], y (B,))`` predicts eps (B, C, H, W)."""

    def __init__(self, shape: DiTShape) -> None:
        super().__init__()
        self.shape = shape
        dim, patch = shape.hidden_dim, shape.patch_size
        grid = shape.input_size // patch
        self.patch_embed = nn.Conv2d(shape.in_channels, dim, patch, stride=patch)
        self.time_embed = TimestepEmbedder(shape.frequency_dim, dim)
        self.class_embed = nn.Embedding(shape.num_classes + 1, dim)
        blocks = [DiTBlock(dim, shape.num_heads, shape.mlp_ratio) for _ in range(shape.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final = FinalLayer(dim, patch * patch * shape.in_channels)
        self.register_buffer("pos_embed", sincos_2d(dim, grid, grid)[None], persistent=False)  # (1, T, D)
        # adaLN-Zero: every residual branch and the output start at zero.
        for layer in [*(b.modulation for b in blocks), self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        patch, size = self.shape.patch_size, self.shape.input_size
        grid = size // patch
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.time_embed(t) + self.class_embed(y)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final(tokens, c)  # (B, T, p * p * C)
        channels = out.shape[-1] // (patch * patch)
        out = out.view(x.shape[0], grid, grid, patch, patch, channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], channels, size, size)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor (a tied embedding) counted once."""
    return sum(p.numel() for p in model.parameters())


def diffusion_loss(
    model: DiT, x0: torch.Tensor, labels: torch.Tensor, alpha_bar: torch.Tensor, label_drop: float
) -> torch.Tensor:
    """The eps-prediction loss ``E ||f(x_t, t, y) - eps||^2`` (Ho et al. 2020, "L_simple"), as xax's
    ``diffusion_loss``: one uniform step ``i`` per sample, seen by the network at time ``(i + 1) / T``,
    with each label replaced by the null label with probability ``label_drop`` (Ho & Salimans 2022).

    Args:
        model: A ``DiT``.
        x0: Clean latents (B, C, H, W), float32.
        labels: Class labels (B,).
        alpha_bar: The schedule's cumulative signal levels (T,), float32.
        label_drop: The probability of the null label.

    Returns:
        The float32 mean squared error.
    """
    batch = x0.shape[0]
    step = torch.randint(0, alpha_bar.shape[0], (batch,), device=x0.device)
    eps = torch.randn_like(x0)
    level = alpha_bar[step].view(batch, 1, 1, 1)
    x_t = level.sqrt() * x0 + (1 - level).sqrt() * eps
    null = torch.full_like(labels, model.shape.num_classes)
    labels = torch.where(torch.rand(batch, device=x0.device) < label_drop, null, labels)
    out = model(x_t, (step + 1).float() / alpha_bar.shape[0], labels)
    return F.mse_loss(out.float(), eps)
