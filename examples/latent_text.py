"""Captions of MNIST digits and the frozen text encoder of the latent diffusion example.

Every digit gets a caption from a few templates ("a handwritten seven", "the digit seven", ...). A caption
is tokenized once per (template, digit) into a small table; the step looks its rows up by caption id
(``template * 10 + digit``; the last row, the empty caption, is the "no text" of classifier-free guidance)
and runs the encoder on them, so the encoder's outputs are computed in the step, as JaxFM does.

The encoder is an ``xax.arch.Transformer``: by default a small one with a word-level vocabulary of the
templates, its weights drawn from the seed and never trained (it only has to tell captions apart); or any
model ``xax.interop.load_hf`` reads from a local folder (``config.json``, safetensors weights and the
``tokenizer.json`` of the ``tokenizers`` package, which ``transformers`` installs).
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jaxtyping import Bool, Int, PRNGKeyArray

import xax
from xax.arch import Transformer, TransformerConfig
from xax.interop import load_hf

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {}", "the digit {}", "a drawing of the number {}", "{} written by hand")
PAD, BOS = "<pad>", "<bos>"

Tokenize = Callable[[str], list[int]]


def caption(template: int, digit: int) -> str:
    """The caption of caption id ``template * 10 + digit``."""
    return TEMPLATES[template].format(DIGIT_WORDS[digit])


def num_captions() -> int:
    """Captions with text; id ``num_captions()`` is the empty caption."""
    return len(TEMPLATES) * len(DIGIT_WORDS)


def word_vocabulary() -> list[str]:
    """The default encoder's vocabulary: padding, begin-of-text, then every word of the captions."""
    words = {word for template in TEMPLATES for word in template.format("").split()} | set(DIGIT_WORDS)
    return [PAD, BOS, *sorted(words)]


def word_tokenizer() -> tuple[Tokenize, int]:
    """Whitespace tokenization over :func:`word_vocabulary`, each caption after a begin-of-text token;
    returns the function and the vocabulary size."""
    vocab = {word: index for index, word in enumerate(word_vocabulary())}

    def tokenize(text: str) -> list[int]:
        return [vocab[BOS], *(vocab[word] for word in text.split())]

    return tokenize, len(vocab)


def folder_tokenizer(folder: Path) -> Tokenize:
    """The ``tokenizer.json`` of a model folder, each caption after the model's begin-of-text token
    (``bos_token_id``, else ``eos_token_id``, of ``config.json``: GPT-2 begins texts with its end token)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise xax.ConfigError(
            "text_encoder=<folder> needs the tokenizers package (pip install tokenizers, or the torch extra)"
        ) from None
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise xax.ConfigError(f"text_encoder: {path} does not exist; save the model's tokenizer beside its weights")
    tokenizer = Tokenizer.from_file(str(path))
    hf_config = json.loads((folder / "config.json").read_text())
    begin = hf_config.get("bos_token_id", hf_config.get("eos_token_id"))
    if begin is None:
        raise xax.ConfigError(f"text_encoder: {folder / 'config.json'} has no bos_token_id or eos_token_id")
    return lambda text: [int(begin), *tokenizer.encode(text, add_special_tokens=False).ids]


def caption_table(tokenize: Tokenize, max_tokens: int) -> tuple[Int[np.ndarray, "n l"], Bool[np.ndarray, "n l"]]:
    """Token ids and masks (True at text) of every caption id, the empty caption last, right-padded with 0.

    Raises:
        ConfigError: When a caption is longer than ``max_tokens``.
    """
    texts = [caption(i // len(DIGIT_WORDS), i % len(DIGIT_WORDS)) for i in range(num_captions())] + [""]
    tokens = np.zeros((len(texts), max_tokens), np.int32)
    mask = np.zeros((len(texts), max_tokens), bool)
    for row, text in enumerate(texts):
        ids = tokenize(text)
        if len(ids) > max_tokens:
            raise xax.ConfigError(
                f"max_tokens={max_tokens} is shorter than the caption {text!r} ({len(ids)} tokens); raise it"
            )
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
    return tokens, mask


def default_encoder_config(vocab_size: int, width: int, max_tokens: int) -> TransformerConfig:
    """The offline default: a two-layer GPT-2-style transformer, ``width`` wide."""
    return TransformerConfig(
        vocab_size=vocab_size, max_seq_len=max_tokens, d_model=width, num_layers=2, num_heads=4, attention_impl="xla"
    )


def build_tokenizer(folder: str | None) -> Tokenize:
    """The default word tokenizer, or the tokenizer of a local model folder."""
    if folder is None:
        return word_tokenizer()[0]
    return folder_tokenizer(_model_folder(folder))


def build_encoder(folder: str | None, width: int, max_tokens: int, key: PRNGKeyArray) -> Transformer:
    """The frozen text encoder: the default one drawn from ``key``, or a local folder's model."""
    if folder is None:
        return Transformer(default_encoder_config(word_tokenizer()[1], width, max_tokens), key=key)
    return load_hf(_model_folder(folder))


def _model_folder(folder: str) -> Path:
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise xax.ConfigError(f"text_encoder={folder!r} has no config.json; give a save_pretrained folder")
    return path


def template_ids(key: PRNGKeyArray, digits: Int[jax.Array, " b"]) -> Int[jax.Array, " b"]:
    """A caption id per digit, its template drawn uniformly."""
    templates = jax.random.randint(key, digits.shape, 0, len(TEMPLATES))
    return templates * len(DIGIT_WORDS) + digits


def captions_of(ids: Sequence[int]) -> list[str]:
    """The texts of caption ids (the empty caption for the last id)."""
    return [caption(i // len(DIGIT_WORDS), i % len(DIGIT_WORDS)) if i < num_captions() else "" for i in ids]
