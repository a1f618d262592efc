"""A character-level language model on Tiny Shakespeare: ``python -m examples.shakespeare``.

The default is nanoGPT's ``shakespeare-char`` model (a 6-layer, 384-wide GPT over a 256-character
context, about 10.7M parameters, dropout 0.2, AdamW at 1e-3 with warmup and cosine decay, batches
of 64 windows). It reaches a validation loss of about 1.485 nats per character in 1,500 steps (a
little over a minute on one H100). nanoGPT trains 5,000 steps and reports the best validation loss
seen on the way (1.47); without nanoGPT's dropout on the attention weights this model overfits
sooner (1.89 after 5,000 steps), so its schedule ends where the validation loss is lowest. Any
config field can be overridden on the command line::

    python -m examples.shakespeare                                      # the GPT
    python -m examples.shakespeare model=ssm max_steps=300 valid_every_n_steps=100   # a Mamba-style SSM
    python -m examples.shakespeare mode=sample resume=runs/shakespeare/run_000 'prompt="JULIET:"' num_chars=500

``mode=sample`` restores the weights of a checkpoint (a run directory, its ``checkpoints`` folder or
one step's folder), rebuilds the model from the config saved with them and prints a sample. Values
are read as YAML, so a prompt ending in a colon is quoted inside the shell's quotes.

The text ships in ``examples/data/tinyshakespeare/input.txt`` and is checked against its SHA-256.
The first 90% of its characters train, the last 10% validate; the vocabulary is its 65 characters.
"""

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
from datasets.table import InMemoryTable
from jaxtyping import Array, Float, Int, PRNGKeyArray
from typing_extensions import override

import xax
from xax import LogOptions, PrecisionOptions
from xax.arch import SamplingConfig, SSMConfig, SSMLanguageModel, Transformer, TransformerConfig, generate, sample_token
from xax.checkpoint import read_metadata, resolve_checkpoint, restore_weights
from xax.nn import bits_per_token, cross_entropy, token_accuracy

DATA_PATH = Path(__file__).resolve().parent / "data" / "tinyshakespeare" / "input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
MODES = ("train", "sample")

Batch = dict[str, Array]

# ---- data ------------------------------------------------------------------------------------


def load_text(path: Path = DATA_PATH, sha256: str = DATA_SHA256) -> str:
    """Reads the corpus and checks its SHA-256.

    Args:
        path: The text file.
        sha256: The expected hex digest of its bytes.

    Returns:
        The text.

    Raises:
        DataError: If the file is missing or its digest differs.
    """
    if not path.is_file():
        raise xax.DataError(f"{path} is missing; restore examples/data/tinyshakespeare/input.txt from the repository")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise xax.DataError(f"{path} has SHA-256 {digest}, expected {sha256}; the file is corrupt or was edited")
    return data.decode("utf-8")


@functools.cache
def corpus() -> str:
    """The verified Tiny Shakespeare text (read once per process)."""
    return load_text()


@dataclass(frozen=True)
class Vocabulary:
    """A character vocabulary: token ``i`` is ``chars[i]``, in code-point order.

    Attributes:
        chars: The distinct characters, sorted.
    """

    chars: str

    @classmethod
    def of(cls, text: str) -> "Vocabulary":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Int[np.ndarray, " n"]:
        """Token ids (int32) of a text; raises DataError naming characters outside the vocabulary."""
        lookup = {char: i for i, char in enumerate(self.chars)}
        unknown = sorted(set(text) - lookup.keys())
        if unknown:
            raise xax.DataError(f"characters {unknown} are not in the vocabulary; use only {self.chars!r}")
        return np.fromiter((lookup[char] for char in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_text(text: str) -> tuple[str, str]:
    """The training text (the first 90% of the characters) and the validation text (the rest)."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def window_dataset(ids: Int[np.ndarray, " n"], context: int, stride: int) -> datasets.Dataset:
    """Windows of ``context`` tokens starting every ``stride`` tokens, with their next-token targets.

    Row ``i`` holds ``tokens = ids[s : s + context]`` and ``targets = ids[s + 1 : s + context + 1]`` for
    ``s = i * stride``; windows that would run past the end are left out.

    Args:
        ids: The token ids of the text.
        context: Tokens per window.
        stride: Tokens between the starts of consecutive windows (``context`` for disjoint windows).

    Returns:
        A Dataset with int32 columns "tokens" and "targets", each a fixed-length list of ``context``.
    """
    if len(ids) <= context:
        raise xax.DataError(f"the text has {len(ids)} tokens, not enough for one window of context={context}")
    starts = np.arange(0, len(ids) - context, stride)
    rows = starts[:, None] + np.arange(context)[None, :]  # (N, T)
    features = datasets.Features(
        {name: datasets.List(datasets.Value("int32"), length=context) for name in ("tokens", "targets")}
    )
    columns = {
        name: pa.FixedSizeListArray.from_arrays(pa.array(ids[rows + shift].reshape(-1)), context)
        for name, shift in (("tokens", 0), ("targets", 1))
    }
    # A fingerprint of the inputs spares ``datasets`` hashing every row (0.7 s per column).
    fingerprint = hashlib.sha256(ids.tobytes() + f"{context},{stride}".encode()).hexdigest()[:32]
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(InMemoryTable(pa.table(columns)), info=info, fingerprint=fingerprint)


# ---- models ----------------------------------------------------------------------------------


@dataclass
class GPTOptions:
    num_layers: int = xax.field(6, help="Transformer blocks; nanoGPT's shakespeare-char depth")
    d_model: int = xax.field(384, help="Residual width; nanoGPT's shakespeare-char width (about 10.7M parameters)")
    num_heads: int = xax.field(6, help="Attention heads (64 wide at d_model=384)")
    dropout: float = xax.field(0.2, help="Residual and embedding dropout; a 1M-character corpus overfits without it")
    bias: bool = xax.field(False, help="Biases in linears and LayerNorms; nanoGPT leaves them out (a bit better)")


@dataclass(frozen=True)
class ModelKind:
    """How the task builds, runs and samples one kind of model (an entry of ``MODELS``).

    Attributes:
        build: (config, vocabulary size, key) -> the model.
        logits: (model, tokens (B, T), dropout key or None) -> float32 logits (B, T, V).
        generate: (model, prompt ids (P,), new tokens N, key, sampling) -> the N new ids.
    """

    build: Callable[["Config", int, PRNGKeyArray], eqx.Module]
    logits: Callable[[Any, Int[Array, "b t"], PRNGKeyArray | None], Float[Array, "b t v"]]
    generate: Callable[[Any, Int[np.ndarray, " p"], int, PRNGKeyArray, SamplingConfig], Int[np.ndarray, " n"]]


def _build_gpt(config: "Config", vocab_size: int, key: PRNGKeyArray) -> Transformer:
    gpt = config.gpt
    transformer = TransformerConfig(
        vocab_size=vocab_size,
        max_seq_len=config.context,
        d_model=gpt.d_model,
        num_layers=gpt.num_layers,
        num_heads=gpt.num_heads,
        dropout=gpt.dropout,
        bias=gpt.bias,
        qkv_bias=gpt.bias,
        # A Python loop over 6 blocks compiles fast, and keeps each weight's rank, so the weight
        # decay mask (matrices only) can go by rank.
        scan_layers=False,
        compute_dtype=config.precision.compute_dtype,
    )
    return Transformer(transformer, key=key)


def _gpt_logits(model: Transformer, tokens: Int[Array, "b t"], key: PRNGKeyArray | None) -> Float[Array, "b t v"]:
    return model(tokens, key=key)[0]


def _gpt_generate(
    model: Transformer, prompt: Int[np.ndarray, " p"], num_new: int, key: PRNGKeyArray, sampling: SamplingConfig
) -> Int[np.ndarray, " n"]:
    """Samples past the context length in chunks: each chunk starts from the last half-context of
    text and fills the rest of the context (so at most two shapes are ever compiled)."""
    context = model.config.max_seq_len
    history = [int(token) for token in prompt]
    chunk = 0
    while len(history) - len(prompt) < num_new:
        window = history[-max(context // 2, 1) :]
        out = generate(
            model,
            jnp.asarray(window, dtype=jnp.int32)[None],
            max_new_tokens=context - len(window),
            key=jax.random.fold_in(key, chunk),
            sampling=sampling,
        )
        history.extend(int(token) for token in np.asarray(out.tokens[0]))
        chunk += 1
    return np.asarray(history[len(prompt) : len(prompt) + num_new], dtype=np.int32)


def _build_ssm(config: "Config", vocab_size: int, key: PRNGKeyArray) -> SSMLanguageModel:
    ssm = replace(config.ssm, vocab_size=vocab_size, compute_dtype=config.precision.compute_dtype)
    return SSMLanguageModel(ssm, key=key)


def _ssm_logits(model: SSMLanguageModel, tokens: Int[Array, "b t"], key: PRNGKeyArray | None) -> Float[Array, "b t v"]:
    return model(tokens)


@eqx.filter_jit
def _ssm_decode(
    model: SSMLanguageModel, prompt: Int[Array, "1 p"], num_new: int, key: PRNGKeyArray, sampling: SamplingConfig
) -> Int[Array, "1 n"]:
    """Prefills the prompt in parallel, then decodes one token per ``scan`` step from the state."""
    keys = jax.random.split(key, num_new)
    logits, cache = model.prefill(prompt, model.init_cache(1))  # (1, P, V)
    first = sample_token(logits[:, -1], sampling, keys[0])  # (1,)

    def step(carry: tuple[Any, Array], step_key: PRNGKeyArray) -> tuple[tuple[Any, Array], Array]:
        cache, token = carry
        logits, cache = model.decode_step(token, cache)  # (1, V)
        token = sample_token(logits, sampling, step_key)
        return (cache, token), token

    _, rest = jax.lax.scan(step, (cache, first), keys[1:])  # (N - 1, 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def _ssm_generate(
    model: SSMLanguageModel, prompt: Int[np.ndarray, " p"], num_new: int, key: PRNGKeyArray, sampling: SamplingConfig
) -> Int[np.ndarray, " n"]:
    return np.asarray(_ssm_decode(model, jnp.asarray(prompt, dtype=jnp.int32)[None], num_new, key, sampling)[0])


# Config.model -> how to build, run and sample that model.
MODELS: dict[str, ModelKind] = {
    "gpt": ModelKind(_build_gpt, _gpt_logits, _gpt_generate),
    "ssm": ModelKind(_build_ssm, _ssm_logits, _ssm_generate),
}

# ---- the task --------------------------------------------------------------------------------


@dataclass
class Config(xax.SupervisedConfig):
    model: str = xax.field("gpt", help="'gpt' (a small GPT) or 'ssm' (a Mamba-style state-space model)")
    context: int = xax.field(256, help="Characters per training window (and the GPT's context); nanoGPT's 256")
    train_stride: int = xax.field(
        16,
        help="A training window starts every N characters (rows the loader shuffles); 16 puts each character "
        "at 16 positions of a window, close to random offsets, in ~63k rows",
    )
    gpt: GPTOptions = xax.field(GPTOptions(), help="The GPT's shape (model=gpt)")
    ssm: SSMConfig = xax.field(
        SSMConfig(d_model=384, num_layers=6),
        help="The SSM's shape (model=ssm): 6 x 384 like the GPT; vocab_size and compute_dtype follow the data and "
        "precision",
    )
    learning_rate: float = xax.field(1e-3, help="Peak learning rate; nanoGPT's for this small model")
    min_learning_rate: float = xax.field(1e-4, help="Learning rate at the end of the cosine decay (peak / 10)")
    warmup_steps: int = xax.field(100, help="Linear warmup steps before the cosine decay")
    weight_decay: float = xax.field(0.1, help="AdamW decay of the weight matrices (not biases, norms or vectors)")
    beta2: float = xax.field(0.99, help="Adam's beta2; above the usual 0.95 since batches of 16k characters are small")
    mode: str = xax.field("train", help="'train', or 'sample': print text generated from the checkpoint in `resume`")
    prompt: str = xax.field("ROMEO:", help="Text that generated samples continue (logged ones and mode=sample)")
    num_chars: int = xax.field(500, help="Characters to generate after the prompt")
    temperature: float = xax.field(0.8, help="Sampling temperature; below 1 trades variety for coherence")
    top_k: int | None = xax.field(None, help="Sample only from the K most likely characters (None: all)")
    # The recipe's values for options every task has.
    batch_size: int = xax.field(64, help="Windows per optimizer step (64 x 256 = 16k characters)")
    max_steps: int | None = xax.field(
        1500,
        help="Optimizer steps; the validation loss is lowest here (nanoGPT's 5,000 overfit without attention dropout)",
    )
    valid_every_n_steps: int | None = xax.field(500, help="Validate every N steps")
    max_grad_norm: float | None = xax.field(1.0, help="Clip gradients to this global norm, as nanoGPT does")
    precision: PrecisionOptions = xax.field(
        PrecisionOptions(compute_dtype="bfloat16"), help="Mixed precision: bfloat16 compute, made for GPUs"
    )
    log: LogOptions = xax.field(
        LogOptions(heavy_every_n_steps=500), help="Logging options (a generated sample every 500 steps)"
    )


class Shakespeare(xax.SupervisedTask[Config]):
    """Next-character prediction: mean cross-entropy per character, in nats."""

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        return Vocabulary.of(corpus())

    @property
    def kind(self) -> ModelKind:
        return MODELS[self.config.model]

    @override
    def validate_config(self) -> None:
        config = self.config
        if config.model not in MODELS:
            raise xax.ConfigError(f"model={config.model!r} is not one of {sorted(MODELS)}")
        if config.mode not in MODES:
            raise xax.ConfigError(f"mode={config.mode!r} is not one of {list(MODES)}")
        for key in ("context", "train_stride", "num_chars"):
            if getattr(config, key) < 1:
                raise xax.ConfigError(f"{key}={getattr(config, key)} must be at least 1")
        if not config.prompt:
            raise xax.ConfigError("prompt is empty; give at least one character, e.g. prompt=ROMEO:")
        try:
            self.vocab.encode(config.prompt)
        except xax.DataError as error:
            raise xax.ConfigError(f"prompt={config.prompt!r}: {error}") from None
        super().validate_config()

    @override
    def get_model(self, params: xax.InitParams) -> eqx.Module:
        return self.kind.build(self.config, len(self.vocab), params.key)

    @override
    def get_optimizer(self) -> optax.GradientTransformation:
        config = self.config
        total = self.expected_total_steps() or 5000
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, min(config.warmup_steps, total // 2), total, end_value=config.min_learning_rate
        )
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=schedule,
            b2=config.beta2,
            weight_decay=config.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        )

    @override
    def get_output(self, model: Any, batch: Batch, state: xax.State, key: PRNGKeyArray) -> Float[Array, "b t v"]:
        # Dropout only while training: the validation step also passes a key.
        return self.kind.logits(model, batch["tokens"], key if state.phase == "train" else None)

    @override
    def compute_loss(
        self, model: Any, batch: Batch, output: Float[Array, "b t v"], state: xax.State, key: PRNGKeyArray
    ) -> Array:
        return cross_entropy(output, batch["targets"])

    @override
    def compute_metrics(
        self, model: Any, batch: Batch, output: Float[Array, "b t v"], loss: Array, state: xax.State
    ) -> dict[str, xax.Metric]:
        return {
            "accuracy": xax.Scalar(token_accuracy(output, batch["targets"])),
            "bits_per_char": xax.Scalar(bits_per_token(loss)),
        }

    @override
    def compute_media(
        self, model: Any, batch: Batch, output: Float[Array, "b t v"], state: xax.State
    ) -> dict[str, xax.Metric]:
        # Decoded on the logging thread.
        return {"sample": xax.Tokens(self.generate_ids(model), self.vocab.decode)}

    def generate_ids(self, model: Any) -> Int[np.ndarray, " n"]:
        """The prompt's ids followed by ``num_chars`` sampled ones.

        The key depends on the seed alone, so logged samples differ only by the weights, and
        ``mode=sample`` reproduces the sample logged with the same weights and settings.
        """
        config = self.config
        key = jax.random.fold_in(jax.random.key(config.seed), 3)
        sampling = SamplingConfig(temperature=config.temperature, top_k=config.top_k)
        prompt = self.vocab.encode(config.prompt)
        new = self.kind.generate(model, prompt, config.num_chars, key, sampling)
        return np.concatenate([prompt, new])

    def generate_text(self, model: Any) -> str:
        """The prompt followed by ``num_chars`` sampled characters (see ``generate_ids``)."""
        return self.vocab.decode(self.generate_ids(model))

    @override
    def batch_columns(self) -> tuple[str, ...]:
        return ("tokens", "targets")

    @override
    def tokens_per_sample(self) -> int:
        return self.config.context  # the console shows tokens/s

    @override
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        train, valid = split_text(corpus())
        if phase == "train":
            return window_dataset(self.vocab.encode(train), self.config.context, self.config.train_stride)
        return window_dataset(self.vocab.encode(valid), self.config.context, self.config.context)

    @override
    def run(self) -> xax.State:
        if self.config.mode == "sample":
            self.validate_config()
            print(self.sample_from_checkpoint())
            return xax.State()
        return super().run()

    def sample_from_checkpoint(self) -> str:
        """Restores the weights in ``resume`` (the EMA when saved), with the model settings saved
        beside them, and generates text from ``prompt``."""
        if self.config.resume in (None, "auto"):
            raise xax.ConfigError("mode=sample needs resume=<run directory or checkpoint path>")
        directory, steps = resolve_checkpoint(Path(self.config.resume))
        saved = read_metadata(directory, steps[0])["config"]
        self.config = replace(
            self.config,
            model=saved["model"],
            context=saved["context"],
            gpt=GPTOptions(**saved["gpt"]),
            ssm=SSMConfig(**saved["ssm"]),
        )
        model = restore_weights(self.get_model(xax.InitParams(key=jax.random.key(0))), directory, steps[0])
        return self.generate_text(model)


if __name__ == "__main__":
    Shakespeare.launch(Config())
