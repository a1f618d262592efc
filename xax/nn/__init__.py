"""Reusable layers: embeddings, norms, feed-forward blocks, attention, LoRA and losses."""

from xax.nn.attention import KVCache as KVCache
from xax.nn.attention import MultiHeadAttention as MultiHeadAttention
from xax.nn.attention import dot_product_attention as dot_product_attention
from xax.nn.embeddings import Embedding as Embedding
from xax.nn.embeddings import RopeScaling as RopeScaling
from xax.nn.embeddings import RotaryEmbedding as RotaryEmbedding
from xax.nn.embeddings import apply_rotary as apply_rotary
from xax.nn.embeddings import rope_frequencies as rope_frequencies
from xax.nn.embeddings import sinusoidal_embedding as sinusoidal_embedding
from xax.nn.lora import LoRALinear as LoRALinear
from xax.nn.lora import apply_linear as apply_linear
from xax.nn.lora import apply_lora as apply_lora
from xax.nn.lora import linear_paths as linear_paths
from xax.nn.lora import lora_filter as lora_filter
from xax.nn.lora import merge_lora as merge_lora
from xax.nn.lora import partition_lora as partition_lora
from xax.nn.losses import IGNORE_INDEX as IGNORE_INDEX
from xax.nn.losses import chunked_cross_entropy as chunked_cross_entropy
from xax.nn.losses import cross_entropy as cross_entropy
from xax.nn.losses import perplexity as perplexity
from xax.nn.losses import projected_cross_entropy as projected_cross_entropy
from xax.nn.losses import token_accuracy as token_accuracy
from xax.nn.mlp import MLP as MLP
from xax.nn.mlp import SwiGLU as SwiGLU
from xax.nn.norms import LayerNorm as LayerNorm
from xax.nn.norms import RMSNorm as RMSNorm
