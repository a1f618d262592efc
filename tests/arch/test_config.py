"""Every model config follows one convention: frozen, registered as a pytree, a help line per field, the
same names for the same things, and one-line ModelConfigErrors; every model module declares its rules."""

import dataclasses
from typing import Any

import jax
import pytest

import xax.arch
from xax.arch import (
    DiTConfig,
    MMDiTConfig,
    ModelConfigError,
    SamplingConfig,
    SSMConfig,
    TransformerConfig,
    UNetConfig,
    VAEConfig,
    dit,
    mmdit,
    ssm,
    transformer,
    unet,
    vae,
)
from xax.core.errors import ConfigError
from xax.parallel import ShardingError, compile_rules, logical_axes

CONFIGS = (TransformerConfig, SSMConfig, DiTConfig, MMDiTConfig, UNetConfig, VAEConfig, SamplingConfig)

# A value each config refuses, and the start of its message.
BAD_VALUES: dict[type, tuple[dict[str, Any], str]] = {
    TransformerConfig: ({"num_layers": 0}, "TransformerConfig.num_layers=0 must be at least 1"),
    SSMConfig: ({"d_model": 0}, "SSMConfig.d_model=0 must be at least 1"),
    DiTConfig: ({"num_heads": 5}, "DiTConfig.d_model=768 must be divisible by num_heads=5"),
    MMDiTConfig: ({"attention_impl": "flash"}, "MMDiTConfig.attention_impl='flash' is unknown"),
    UNetConfig: ({"remat": "all"}, "UNetConfig.remat='all' is unknown"),
    VAEConfig: ({"num_res_blocks": 0}, "VAEConfig.num_res_blocks=0 must be at least 1"),
    SamplingConfig: ({"top_k": 0}, "SamplingConfig.top_k=0 must be a positive integer"),
}


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_configs_are_frozen_registered_and_documented(config_class: Any) -> None:
    config = config_class()
    assert config_class.__dataclass_params__.frozen  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.__setattr__(dataclasses.fields(config)[0].name, None)
    # A pytree without leaves: every field is static metadata, so the config passes through jit.
    assert jax.tree.leaves(config) == []
    assert jax.tree.unflatten(jax.tree.structure(config), []) == config
    hash(config)
    undocumented = [f.name for f in dataclasses.fields(config) if not f.metadata.get("help")]
    assert not undocumented, f"{config_class.__name__} fields without help: {undocumented}"


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_a_bad_value_is_a_one_line_config_error_naming_the_field(config_class: Any) -> None:
    changes, message = BAD_VALUES[config_class]
    with pytest.raises(ModelConfigError) as info:
        config_class(**changes)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    # dataclasses.replace validates again.
    with pytest.raises(ModelConfigError):
        dataclasses.replace(config_class(), **changes)


def test_the_same_thing_has_the_same_name() -> None:
    def names(config_class: Any) -> set[str]:
        return {f.name for f in dataclasses.fields(config_class)}

    for config_class in (TransformerConfig, SSMConfig, DiTConfig):
        assert {"d_model", "num_layers"} <= names(config_class), config_class.__name__
    for config_class in (TransformerConfig, DiTConfig, MMDiTConfig, UNetConfig):
        assert {"num_heads", "attention_impl"} <= names(config_class), config_class.__name__
    for config_class in (TransformerConfig, DiTConfig):
        assert {"scan_layers", "remat"} <= names(config_class), config_class.__name__
    for config_class in (DiTConfig, UNetConfig, VAEConfig):
        assert "in_channels" in names(config_class)
    for old in ("depth", "hidden_dim", "scan_blocks"):
        assert old not in names(DiTConfig)


def test_every_model_declares_its_rules_and_the_default_joins_them() -> None:
    modules = (transformer, ssm, dit, mmdit, unet, vae)
    joined = set(xax.arch.SHARDING_RULES)
    for module in modules:
        assert module.SHARDING_RULES, module.__name__
        assert set(module.SHARDING_RULES) <= joined, module.__name__
        compile_rules(module.SHARDING_RULES)
    # A rule applies only where it is passed: the SSM's rules know nothing of the transformer's names.
    assert logical_axes("lm_head.weight", (8, 4), ssm.SHARDING_RULES) is None
    assert logical_axes("lm_head.weight", (8, 4)) == ("vocab", "embed")
    assert logical_axes("unembed", (8, 4), ssm.SHARDING_RULES) == ("vocab", "embed")


def test_a_rule_naming_an_unknown_axis_is_refused() -> None:
    with pytest.raises(ShardingError, match=r"sharding rule 'w\$' names the axis 'width'; use one of"):
        compile_rules((("w$", ("width",)),))
