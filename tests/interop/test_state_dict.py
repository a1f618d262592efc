"""The table-driven converter: torch modules' state dicts onto Equinox modules, back, and its refusals."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xax.interop import (
    Chain,
    Reshape,
    Rule,
    Split,
    StateDictError,
    Transpose,
    load_state_dict,
    read_safetensors,
    to_state_dict,
    write_safetensors,
)
from xax.testing import assert_parity

NEEDS_TORCH = "needs the torch extra (torch, transformers), which `make install` adds on Python 3.11 only"
torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=NEEDS_TORCH)

RTOL, ATOL = 1e-6, 1e-6


class Stack(eqx.Module):
    """Linears stacked on a leading axis (as scanned layers are) between an input and output layer."""

    proj_in: eqx.nn.Linear
    layers: eqx.nn.Linear
    proj_out: eqx.nn.Linear

    def __init__(self, num_layers: int, *, key: jax.Array) -> None:
        k_in, k_layers, k_out = jax.random.split(key, 3)
        self.proj_in = eqx.nn.Linear(6, 8, key=k_in)
        self.layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(8, 8, key=k))(jax.random.split(k_layers, num_layers))
        self.proj_out = eqx.nn.Linear(8, 4, use_bias=False, key=k_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.vmap(self.proj_in)(x)
        params, static = eqx.partition(self.layers, eqx.is_array)
        h, _ = jax.lax.scan(lambda h, p: (jax.nn.gelu(jax.vmap(eqx.combine(p, static))(h)), None), h, params)
        return jax.vmap(self.proj_out)(h)


class TorchStack(torch.nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(6, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(num_layers))
        self.proj_out = torch.nn.Linear(8, 4, bias=False)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = torch.nn.functional.gelu(block(h), approximate="tanh")
        return self.proj_out(h)


STACK_TABLE = [
    Rule("proj_in.{p:weight|bias}", "proj_in.{p}"),
    Rule("blocks.{i}.{p:weight|bias}", "layers.{p}[{i}]"),
    Rule("proj_out.weight", "proj_out.weight"),
    Rule("steps", None),
]


def _torch_stack(num_layers: int = 3) -> TorchStack:
    torch.manual_seed(0)
    return TorchStack(num_layers).eval()


def _template(num_layers: int = 3) -> Stack:
    return eqx.filter_eval_shape(Stack, num_layers, key=jax.random.key(0))


def test_stacked_layers_load_and_match_torch() -> None:
    reference = _torch_stack()
    model = load_state_dict(_template(), reference.state_dict(), STACK_TABLE)
    assert model.layers.weight.shape == (3, 8, 8)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    assert_parity(model, reference, [x], rtol=RTOL, atol=ATOL)


def test_export_gives_back_the_state_dict_exactly() -> None:
    state_dict = {k: v.numpy() for k, v in _torch_stack().state_dict().items() if k != "steps"}
    exported = to_state_dict(load_state_dict(_template(), state_dict, STACK_TABLE), STACK_TABLE)
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value)
        assert exported[key].dtype == value.dtype


class Attention(eqx.Module):
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jax.vmap(self.q)(x), jax.vmap(self.k)(x), jax.vmap(self.v)(x)


def test_conv1d_fused_qkv_is_transposed_and_split() -> None:
    # GPT-2's Conv1D: y = x @ W + b with W of shape (in, out); q, k, v fused along out.
    rng = np.random.default_rng(0)
    fused_w, fused_b = rng.normal(size=(6, 3 * 4)).astype(np.float32), rng.normal(size=(12,)).astype(np.float32)
    table = [
        Rule("c_attn.weight", ("q.weight", "k.weight", "v.weight"), Chain(Transpose(), Split(3))),
        Rule("c_attn.bias", ("q.bias", "k.bias", "v.bias"), Split(3)),
    ]
    shapes = eqx.filter_eval_shape(
        lambda key: Attention(*(eqx.nn.Linear(6, 4, key=k) for k in jax.random.split(key, 3))), jax.random.key(0)
    )
    model = load_state_dict(shapes, {"c_attn.weight": fused_w, "c_attn.bias": fused_b}, table)

    def conv1d(x: torch.Tensor) -> tuple:
        return torch.split(x @ torch.tensor(fused_w) + torch.tensor(fused_b), 4, dim=-1)

    x = rng.normal(size=(5, 6)).astype(np.float32)
    assert_parity(model, conv1d, [x], rtol=RTOL, atol=ATOL)
    exported = to_state_dict(model, table)
    np.testing.assert_array_equal(exported["c_attn.weight"], fused_w)
    np.testing.assert_array_equal(exported["c_attn.bias"], fused_b)


class Heads(eqx.Module):
    q: jax.Array
    kv: jax.Array


def test_unequal_split_and_reshape_round_trip() -> None:
    fused = np.arange(18, dtype=np.float32).reshape(6, 3)
    table = [Rule("qkv", ("q", "kv"), Split((4, 2)))]
    model = load_state_dict(Heads(jnp.zeros((4, 3)), jnp.zeros((2, 3))), {"qkv": fused}, table)
    np.testing.assert_array_equal(np.asarray(model.q), fused[:4])
    np.testing.assert_array_equal(np.asarray(model.kv), fused[4:])
    np.testing.assert_array_equal(to_state_dict(model, table)["qkv"], fused)

    table = [Rule("q", "q", Reshape((12,), (4, 3))), Rule("kv", "kv")]
    state_dict = {"q": np.arange(12, dtype=np.float32), "kv": fused[:2]}
    model = load_state_dict(Heads(jnp.zeros((4, 3)), jnp.zeros((2, 3))), state_dict, table)
    np.testing.assert_array_equal(np.asarray(model.q), state_dict["q"].reshape(4, 3))
    np.testing.assert_array_equal(to_state_dict(model, table)["q"], state_dict["q"])


def test_a_failing_transform_names_the_key_and_row() -> None:
    table = [Rule("q", "q", Reshape((12,), (4, 3))), Rule("kv", "kv")]
    state_dict = {"q": np.zeros(18, np.float32), "kv": np.zeros((2, 3), np.float32)}
    with pytest.raises(
        StateDictError, match=r"'q': Reshape\(.*\) of Rule\('q'\) failed: Reshape expected shape \(12,\)"
    ):
        load_state_dict(Heads(jnp.zeros((4, 3)), jnp.zeros((2, 3))), state_dict, table)


def test_an_unmapped_key_is_named() -> None:
    state_dict = {**_torch_stack().state_dict(), "blocks.0.scale": torch.ones(8)}
    with pytest.raises(StateDictError, match=r"state_dict keys 'blocks\.0\.scale' match no row of the table"):
        load_state_dict(_template(), state_dict, STACK_TABLE)


def test_missing_leaves_and_layer_indices_are_named() -> None:
    state_dict = _torch_stack().state_dict()
    del state_dict["proj_out.weight"], state_dict["blocks.2.bias"]
    with pytest.raises(StateDictError, match=r"model leaves 'layers\.bias\[2\]', 'proj_out\.weight' are filled by no"):
        load_state_dict(_template(), state_dict, STACK_TABLE)


def test_shape_mismatch_names_both_sides() -> None:
    state_dict = {**_torch_stack().state_dict(), "blocks.1.weight": torch.zeros(7, 8)}
    with pytest.raises(
        StateDictError, match=r"'blocks\.1\.weight' has shape \(7, 8\) .*'layers\.weight\[1\]' needs \(8, 8\)"
    ):
        load_state_dict(_template(), state_dict, STACK_TABLE)


def test_more_layers_than_the_model_is_an_error() -> None:
    with pytest.raises(
        StateDictError, match=r"'blocks\.3\.weight' maps to layers\.weight\[3\], but that leaf has shape \(3, 8, 8\)"
    ):
        load_state_dict(_template(3), _torch_stack(4).state_dict(), STACK_TABLE)


def test_a_path_the_model_lacks_is_named() -> None:
    table = [Rule("proj_in.{p:weight|bias}", "input.{p}"), *STACK_TABLE]
    with pytest.raises(
        StateDictError, match=r"'proj_in\.weight' maps to Equinox path 'input\.weight', which the model"
    ):
        load_state_dict(_template(), _torch_stack().state_dict(), table)


def test_the_first_matching_row_wins_and_double_fills_are_refused() -> None:
    state_dict = _torch_stack().state_dict()
    shadowed = [Rule("blocks.0.weight", None), *STACK_TABLE]
    with pytest.raises(StateDictError, match=r"'layers\.weight\[0\]' are filled by no"):
        load_state_dict(_template(), state_dict, shadowed)
    doubled = [*STACK_TABLE[:3], Rule("steps", "proj_out.weight")]
    state_dict["steps"] = torch.zeros(4, 8)
    with pytest.raises(
        StateDictError, match=r"fills 'proj_out\.weight' \(index None\), which another key already fills"
    ):
        load_state_dict(_template(), state_dict, doubled)


def test_export_refuses_leaves_outside_the_table() -> None:
    model = load_state_dict(_template(), _torch_stack().state_dict(), STACK_TABLE)
    with pytest.raises(StateDictError, match=r"model leaves 'proj_out\.weight' are exported by no row"):
        to_state_dict(model, STACK_TABLE[:2])


def test_rules_must_share_placeholders() -> None:
    with pytest.raises(
        ValueError, match=r"Equinox path 'layers\.weight' has placeholders \[\], the torch name has \['i'\]"
    ):
        Rule("blocks.{i}.weight", "layers.weight")


def test_safetensors_written_by_torch_are_read_without_pickle(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5)}
    safetensors_torch.save_file(tensors, tmp_path / "w.safetensors")
    loaded = read_safetensors(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(loaded["a"].astype(np.float32), tensors["a"].float().numpy())
    np.testing.assert_array_equal(loaded["b"], tensors["b"].numpy())
    write_safetensors({"c": np.ones((2, 2), np.float32)}, tmp_path / "x.safetensors")
    assert torch.equal(safetensors_torch.load_file(tmp_path / "x.safetensors")["c"], torch.ones(2, 2))


def test_bfloat16_torch_tensors_load_as_the_leaf_dtype() -> None:
    reference = _torch_stack().to(torch.bfloat16)
    model = load_state_dict(_template(), reference.state_dict(), STACK_TABLE)
    assert model.proj_in.weight.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(model.proj_in.weight), reference.proj_in.weight.detach().float().numpy())
