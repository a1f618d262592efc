"""Hugging Face GPT-2 and Llama-family (Llama, Qwen2, Mistral) checkpoints to and from ``Transformer``.

A checkpoint is a local folder with ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), as ``save_pretrained`` writes it, or a model id of the Hugging Face
hub ("Qwen/Qwen2-0.5B"), whose config and safetensors files ``huggingface_hub`` downloads once into
its cache (read from there with ``HF_HUB_OFFLINE=1``). Loading reads ``config.json``
into a ``TransformerConfig`` and maps the weights through the family's declared ``Rule`` table
(see ``xax.arch.transformer`` for the names); saving does the reverse, in a folder that
``transformers``' ``from_pretrained`` loads::

    model = xax.interop.load_hf("Qwen/Qwen2-0.5B", overrides={"compute_dtype": "bfloat16"})
    xax.interop.save_hf(model, "path/to/out", model_type="qwen2")

Every ``config.json`` field is either handled (read into the config, or checked to have the one
value the model supports) or listed as irrelevant to the weights and the forward pass (token ids,
dropout rates, the storage dtype, ...); any other field is an error that names it, so a checkpoint
with a feature the model lacks cannot load silently wrong.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from xax.arch.transformer import Transformer, TransformerConfig
from xax.core.errors import ConfigError, HubError
from xax.interop.hf_families import COMMON_IGNORED, RUNTIME_FIELDS, HfFields, family_of
from xax.interop.state_dict import (
    Rule,
    StateDictError,
    load_state_dict,
    read_safetensors,
    to_state_dict,
    write_safetensors,
)
from xax.utils.hub import OFFLINE_FIX, hub_endpoint

# What a checkpoint folder holds that loading reads; other files of a hub repository are not downloaded.
HF_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json")


def config_from_hf(hf_config: Mapping[str, Any]) -> TransformerConfig:
    """Converts a ``config.json`` dict to a ``TransformerConfig``.

    Args:
        hf_config: The parsed ``config.json``; its ``model_type`` picks the family.

    Returns:
        The config; runtime fields (``RUNTIME_FIELDS``) keep their defaults.

    Raises:
        ConfigError: An unknown ``model_type``, a field the converter neither handles nor lists
            as irrelevant, or a value the model does not implement.
    """
    model_type = hf_config.get("model_type")
    family = family_of(model_type)
    unknown = sorted(set(hf_config) - set(family.defaults) - set(family.ignored) - set(COMMON_IGNORED))
    if unknown:
        raise ConfigError(
            f"config.json: fields {unknown} of model_type {model_type!r} are not handled by the converter; "
            f"a field that changes the model cannot be ignored (handled: {sorted(family.defaults)})"
        )
    return family.from_hf(HfFields(hf_config, family.defaults, str(model_type)))


def config_to_hf(config: TransformerConfig, model_type: str) -> dict[str, Any]:
    """Converts a ``TransformerConfig`` to a ``config.json`` dict of the given family.

    Raises:
        ConfigError: The config uses something the family cannot express (e.g. RoPE as "gpt2").
    """
    family = family_of(model_type)
    body = family.to_hf(config)
    return {"model_type": model_type, "architectures": [family.architecture], "dtype": "float32", **body}


def hf_table(config: TransformerConfig, model_type: str) -> list[Rule]:
    """The name table between a family's state dict and a ``Transformer`` built from ``config``."""
    return family_of(model_type).table(config)


def read_hf_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """Reads ``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists.

    Raises:
        StateDictError: No safetensors checkpoint (pickled ``*.bin`` files are never read: unpickling
            runs code), or shards that disagree with their index.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        state_dict: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            for key, value in read_safetensors(folder / shard).items():
                if weight_map.get(key) != shard or key in state_dict:
                    raise StateDictError(f"{folder / shard}: {key!r} is not listed for this shard in {index.name}")
                state_dict[key] = value
        if missing := sorted(set(weight_map) - set(state_dict)):
            raise StateDictError(f"{index}: lists {missing[:8]} but no shard holds them")
        return state_dict
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = f"; {pickles} are pickles, never read because unpickling runs code" if pickles else ""
    raise StateDictError(
        f"{folder} has no model.safetensors or model.safetensors.index.json{hint}; "
        "re-save the model with transformers' save_pretrained, which writes safetensors"
    )


def hf_folder(name: str | Path, *, revision: str | None = None) -> Path:
    """The folder of a checkpoint: a local folder as is, or a hub model id's snapshot in the cache.

    Args:
        name: A local folder, or a model id of the Hugging Face hub ("gpt2", "Qwen/Qwen2-0.5B").
        revision: The hub revision (a branch, tag or commit); None is the default branch.

    Returns:
        A folder holding ``config.json`` and the safetensors weights.

    Raises:
        ConfigError: A revision given with a local folder.
        HubError: ``name`` is no local folder and the hub cannot give it: offline (``HF_HUB_OFFLINE``)
            or unreachable with no copy in the cache, no such model, or no access to it.
    """
    if Path(name).is_dir():
        if revision is not None:
            raise ConfigError(f"load_hf: revision={revision!r} is for a hub model id; {name} is a local folder")
        return Path(name)
    from huggingface_hub import constants, errors, snapshot_download

    repo_id = str(name)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HF_CHECKPOINT_FILES)))
    except errors.HFValidationError:
        raise HubError(f"load_hf: {repo_id!r} is neither a local folder nor a Hugging Face model id") from None
    except errors.LocalEntryNotFoundError as error:
        cause = error.__cause__
        if constants.HF_HUB_OFFLINE:
            reason = "offline mode is on (HF_HUB_OFFLINE)"
        else:
            reason = f"{hub_endpoint()} cannot be reached ({type(cause).__name__}: {cause})"
        raise HubError(
            f"load_hf: {repo_id!r} is not a local folder, nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and {reason}; give the folder save_pretrained wrote, or load the model once with network access"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"load_hf: {repo_id!r} is not a local folder, and {hub_endpoint()} has no model of that id that you may "
            "read (a private or gated model needs a token: `hf auth login` or HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"load_hf: model {repo_id!r} has no revision {revision!r}") from None
    except errors.HfHubHTTPError as error:
        first_line = str(error).splitlines()[0]
        raise HubError(f"load_hf: {repo_id!r} from {hub_endpoint()}: {first_line}; {OFFLINE_FIX}") from None


def load_hf(
    folder: str | Path, *, overrides: Mapping[str, Any] | None = None, revision: str | None = None
) -> Transformer:
    """Loads a GPT-2, Llama, Qwen2 or Mistral checkpoint into a ``Transformer``.

    Args:
        folder: A folder with ``config.json`` and safetensors weights (``save_pretrained``'s layout),
            or a model id of the Hugging Face hub (see ``hf_folder``).
        overrides: Values of ``RUNTIME_FIELDS`` (``compute_dtype``, ``scan_layers``, ...).
        revision: The hub revision of a model id (a branch, tag or commit).

    Returns:
        The model, with float32 parameters.
    """
    folder = hf_folder(folder, revision=revision)
    hf_config = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf_config)
    if overrides:
        if bad := sorted(set(overrides) - set(RUNTIME_FIELDS)):
            raise ConfigError(f"load_hf: overrides {bad} are fixed by the checkpoint; only {RUNTIME_FIELDS} may be set")
        config = config.with_updates(**overrides)
    prefix = family_of(hf_config["model_type"]).prefix
    state_dict = read_hf_weights(folder)
    if not any(key.startswith(prefix) for key in state_dict):
        # Saved from the base model (GPT2Model, LlamaModel): names lack the causal LM's prefix.
        state_dict = {key if key.startswith("lm_head.") else prefix + key: v for key, v in state_dict.items()}
    shapes = eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))
    return load_state_dict(shapes, state_dict, hf_table(config, hf_config["model_type"]))


def save_hf(model: Transformer, folder: str | Path, *, model_type: str, max_shard_bytes: int | None = None) -> None:
    """Writes ``config.json`` and safetensors weights that ``from_pretrained`` loads.

    Args:
        model: The model; merge LoRA adapters first (``xax.nn.merge_lora``).
        folder: The output folder; created if needed, and it must hold no checkpoint yet.
        model_type: "gpt2", "llama", "qwen2" or "mistral".
        max_shard_bytes: If set, weights are split into shards of at most about this size,
            with a ``model.safetensors.index.json``; None writes one ``model.safetensors``.
    """
    folder = Path(folder)
    hf_config = config_to_hf(model.config, model_type)
    state_dict = to_state_dict(model, hf_table(model.config, model_type))
    folder.mkdir(parents=True, exist_ok=True)
    if existing := sorted(p.name for p in folder.glob("*.safetensors*")):
        raise StateDictError(f"save_hf: {folder} already holds {existing}; write to an empty folder")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _shards(state_dict, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(state_dict, folder / "model.safetensors")
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / name)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(v.nbytes for v in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _shards(state_dict: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """Groups tensors in order into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in state_dict.items():
        if max_bytes is not None and shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards
