"""Mesh, sharding rules, plans, validation errors and the report, without training."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xax.arch.dit import DiT, dit_config
from xax.arch.ssm import SSMConfig, SSMLanguageModel
from xax.arch.transformer import Transformer, TransformerConfig
from xax.parallel import (
    BatchSizeError,
    MeshShapeError,
    ParallelOptions,
    Plan,
    PlanError,
    ShardingError,
    check_batch_size,
    logical_axes,
    make_mesh,
    make_report,
    mirror_specs,
    param_spec,
    param_specs,
    plan_axis_sizes,
    shard_bytes,
)
from xax.utils.pytree import path_name

P = PartitionSpec


def sizes(data: int = 1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def floating(x: object) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)


def abstract(build: Any, *args: Any) -> eqx.Module:
    """The model's parameter shapes only (nothing is computed)."""
    return eqx.filter(eqx.filter_eval_shape(build, *args, key=jax.random.key(0)), floating)


def specs_by_name(params: eqx.Module, plan: str, **axes: int) -> dict[str, PartitionSpec]:
    specs = param_specs(params, Plan.parse(plan), sizes(**axes))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {path_name(path): spec for (path, _), spec in zip(leaves, jax.tree.leaves(specs, is_leaf=_is_spec))}


def _is_spec(x: object) -> bool:
    return isinstance(x, PartitionSpec)


# ---- mesh ---------------------------------------------------------------------------------------


def test_mesh_fills_the_rest_and_keeps_device_order() -> None:
    devices = jax.devices()[:4]
    mesh = make_mesh(devices, data=-1, fsdp=2, tensor=1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert list(mesh.devices.flat) == devices


def test_mesh_sizes_that_do_not_match_the_device_count_name_the_fix() -> None:
    with pytest.raises(MeshShapeError, match=r"mesh data=2 x fsdp=3 x tensor=1 spans 6 devices but 4 are available"):
        make_mesh(jax.devices()[:4], data=2, fsdp=3, tensor=1)
    with pytest.raises(MeshShapeError, match=r"needs a multiple of 3 devices but 4 are available; set parallel.fsdp"):
        make_mesh(jax.devices()[:4], data=-1, fsdp=3)
    with pytest.raises(MeshShapeError, match=r"at most one -1 .* fix parallel.fsdp"):
        make_mesh(jax.devices()[:4], data=-1, fsdp=-1)


# ---- plans --------------------------------------------------------------------------------------


def test_plan_names_parse_and_unknown_parts_are_errors() -> None:
    assert Plan.parse("tp+fsdp").name == "fsdp+tp"
    with pytest.raises(PlanError, match=r"parallel.plan='zero3' is not a plan; use one of \['dp', 'fsdp', 'tp'\]"):
        Plan.parse("zero3")


def test_axis_sizes_follow_the_plan() -> None:
    def resolve(plan: str, fsdp: int | None = None, tensor: int | None = None) -> dict[str, int]:
        return plan_axis_sizes(Plan.parse(plan), ParallelOptions(plan=plan, fsdp=fsdp, tensor=tensor))

    assert resolve("dp") == sizes(data=-1)
    assert resolve("fsdp") == sizes(fsdp=-1)
    assert resolve("fsdp+tp", tensor=2) == sizes(fsdp=-1, tensor=2)
    with pytest.raises(PlanError, match=r"splits over fsdp and tensor: set all but one of parallel.fsdp, parallel.t"):
        resolve("fsdp+tp")
    with pytest.raises(PlanError, match=r"parallel.tensor=2 but parallel.plan='dp' does not split over tensor; add tp"):
        resolve("dp", tensor=2)


# ---- rules --------------------------------------------------------------------------------------


def test_rules_name_the_transformer_layout() -> None:
    assert logical_axes("layers.self_attn.q_proj.weight", (2, 64, 32)) == ("layers", "heads", "embed")
    assert logical_axes("layers.3.mlp.down_proj.weight", (32, 128)) == ("embed", "mlp")
    assert logical_axes("layers.self_attn.k_proj.base.weight", (16, 32)) == ("kv_heads", "embed")  # LoRA base
    assert logical_axes("embed_tokens.weight", (100, 32)) == ("vocab", "embed")
    assert logical_axes("blocks.qkv.weight", (4, 96, 32)) == ("layers", "heads", "embed")  # stacked DiT blocks
    assert logical_axes("my_model.whatever", (7, 9)) is None
    assert logical_axes("q_proj.weight", (1, 2, 3, 4)) is None  # a rank no rule expects: the default


def test_tensor_parallel_splits_columns_then_rows_and_the_vocabulary() -> None:
    params = abstract(Transformer, TransformerConfig.llama_tiny().with_updates(scan_layers=True))
    specs = specs_by_name(params, "tp", tensor=2)
    assert specs["layers.self_attn.q_proj.weight"] == P(None, "tensor", None)
    assert specs["layers.self_attn.k_proj.weight"] == P(None, "tensor", None)
    assert specs["layers.self_attn.o_proj.weight"] == P(None, None, "tensor")
    assert specs["layers.mlp.gate_proj.weight"] == P(None, "tensor", None)
    assert specs["layers.mlp.down_proj.weight"] == P(None, None, "tensor")
    assert specs["embed_tokens.weight"] == P("tensor", None)
    assert specs["lm_head.weight"] == P("tensor", None)
    assert specs["norm.weight"] == P(None)


def test_fsdp_shards_the_model_width_and_falls_back_to_the_largest_divisible_dimension() -> None:
    params = abstract(Transformer, TransformerConfig.gpt2_tiny().with_updates(scan_layers=True))
    specs = specs_by_name(params, "fsdp", fsdp=4)
    assert specs["layers.mlp.up_proj.weight"] == P(None, None, "fsdp")
    assert specs["embed_positions.weight"] == P(None, "fsdp")
    assert specs["layers.input_layernorm.weight"] == P(None, None)
    plan = Plan.parse("fsdp")
    assert param_spec("head.weight", (10, 64), plan, sizes(fsdp=4)) == P(None, "fsdp")  # unknown: largest
    assert param_spec("conv.weight", (8, 6, 3, 3), plan, sizes(fsdp=4)) == P("fsdp", None, None, None)
    assert param_spec("odd.weight", (3, 5), plan, sizes(fsdp=4)) == P()  # nothing divides: replicated
    assert param_spec("scale", (), plan, sizes(fsdp=4)) == P()


def test_other_architectures_get_specs_for_every_parameter() -> None:
    mesh = make_mesh(jax.devices()[:4], data=1, fsdp=2, tensor=2)
    for params in (
        abstract(DiT, dit_config("DiT-S/8", input_size=16, num_layers=2, num_classes=4)),
        abstract(SSMLanguageModel, SSMConfig(vocab_size=64, d_model=32, num_layers=2)),
    ):
        specs = specs_by_name(params, "fsdp+tp", fsdp=2, tensor=2)
        assert len(specs) == len(jax.tree.leaves(params))
        assert any("tensor" in spec for spec in specs.values()) and any("fsdp" in spec for spec in specs.values())
        for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), specs.values()):
            # Every shard has whole rows: the shardings can be used as they are.
            shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
            assert all(n % s == 0 for n, s in zip(leaf.shape, shard)), path_name(path)


def test_a_dimension_that_does_not_divide_names_the_parameter_axis_and_fix() -> None:
    with pytest.raises(
        ShardingError,
        match=r"parameter embed_tokens.weight dimension 0 \(vocab, size 50257\) is not divisible by mesh axis "
        r"tensor=2; set parallel.tensor to a divisor of 50257, make vocab a multiple of 2",
    ):
        param_spec("embed_tokens.weight", (50257, 768), Plan.parse("tp"), sizes(tensor=2))


def test_optimizer_state_mirrors_the_parameters_and_replicates_scalars() -> None:
    params = {"layers": {"mlp": {"up_proj": {"weight": jnp.zeros((32, 16))}}}, "head": jnp.zeros((12, 16))}
    plan, axes = Plan.parse("fsdp"), sizes(fsdp=4)
    specs = param_specs(params, plan, axes)
    opt_state = optax.adamw(1e-3).init(params)
    opt_specs = mirror_specs(opt_state, params, specs, plan, axes)
    adam = opt_specs[0]
    assert adam.count == P()
    assert adam.mu["layers"]["mlp"]["up_proj"]["weight"] == P(None, "fsdp")
    assert adam.nu["head"] == specs["head"] == P(None, "fsdp")


# ---- validation and report ------------------------------------------------------------------------


def test_batch_size_must_split_over_data_and_fsdp() -> None:
    mesh = make_mesh(jax.devices()[:4], data=2, fsdp=2)
    check_batch_size(8, 2, mesh)
    with pytest.raises(
        BatchSizeError,
        match=r"batch_size=6 is not divisible by grad_accum_steps x data x fsdp = 1 x 2 x 2; use a multiple of 4",
    ):
        check_batch_size(6, 1, mesh)


def test_report_counts_bytes_per_device_from_the_shardings() -> None:
    mesh = make_mesh(jax.devices()[:4], data=1, fsdp=4)
    params = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))}
    bias = {"b": jax.ShapeDtypeStruct((32,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    assert shard_bytes(params) == 64 * 32 * 4 // 4
    assert shard_bytes(bias) == 32 * 4

    def step(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum((x @ w.T) ** 2)

    x = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    compiled = jax.jit(step).lower(params["w"], x).compile()
    report = make_report(
        "fsdp", {"data": 1, "fsdp": 4, "tensor": 1}, {"params": params, "bias": bias}, params, compiled
    )
    assert report.groups["params"] == (64 * 32 * 4, 64 * 32)
    assert report.compiled is not None
    # 8 x 64 outputs of 32 multiply-adds, and the squares and sum: at least 2 * 8 * 64 * 32 / 4 per device.
    assert report.compiled.flops is not None and report.compiled.flops >= 2 * 8 * 64 * 32 / 4
    assert report.compiled.argument_bytes >= (64 * 32 + 8 * 32) * 4 // 4
    text = "\n".join(report.lines())
    assert "Plan fsdp on mesh data=1 x fsdp=4 x tensor=1" in text
    assert "w  (64, 32)" in text and "P('fsdp',)" in text.replace("PartitionSpec", "P")
    assert np.isfinite(report.compiled.peak_bytes)


def test_gathered_spec_drops_only_the_fsdp_axis() -> None:
    from jax.sharding import PartitionSpec as P

    from xax.parallel import gathered_spec

    assert gathered_spec(P("fsdp", None)) == P(None, None)
    assert gathered_spec(P(None, "tensor")) == P(None, "tensor")
    assert gathered_spec(P(("data", "fsdp"), "tensor")) == P("data", "tensor")
    assert gathered_spec(
        P(
            ("fsdp", "tensor"),
        )
    ) == P("tensor")


def test_fsdp_step_moves_weights_not_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    import numpy as np
    from jax.sharding import Mesh

    import xax.task.mixins.train_setup as train_module
    from xax.core.config_io import load_config
    from xax.testing.plan_parity import TinyLM, TinyLMConfig

    compiled: list[Any] = []
    original = train_module.make_report

    def capture(*args: Any) -> Any:
        compiled.append(args[-1])
        return original(*args)

    monkeypatch.setattr(train_module, "make_report", capture)
    config = load_config(TinyLMConfig, TinyLMConfig(batch_size=8), ["parallel.plan=fsdp"])
    task = TinyLM(config)
    task.mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    task.plan_report(compile_step=True)
    text = compiled[0].as_text()
    collectives = re.findall(r"= ([^=]*?) (?:all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", text)
    assert any("64,64]" in shapes for shapes in collectives)  # the weights are gathered
    # No collective carries activations: the global batch of 8 windows of 16 tokens.
    assert not [shapes for shapes in collectives if re.search(r"\[8,16\b", shapes)], collectives
