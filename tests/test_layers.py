"""Each layer's ΔW against the published formula, written out here independently of batchgen/assets/lora_layers.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from batchgen.assets.lora_layers import (
    LAYER_SUFFIXES,
    LAYER_TYPES,
    REPORTED_KINDS,
    WRAPPERS,
    DoRALayer,
    FullLayer,
    LoHaLayer,
    LoKrLayer,
    LoRALayer,
    delta_dims,
    layer_from_tensors,
    layer_kinds,
    min_dims,
    rank_of,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Other test processes share the machine; multi-threaded torch slows to a crawl under contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rand():
    generator = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=generator)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value)


# LoRA / LoCon


def test_lora_linear_is_up_at_down_times_alpha_over_rank(rand):
    up, down = rand(320, 4), rand(4, 768)
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": scalar(2.0)})
    assert_close(layer.delta(torch.zeros(320, 768)), up @ down * (2.0 / 4))
    assert layer.rank() == 4 and layer.kind == "lora"


def test_lora_without_alpha_or_with_zero_alpha_has_scale_one(rand):
    up, down = rand(32, 4), rand(4, 16)
    assert_close(LoRALayer({"lora_up.weight": up, "lora_down.weight": down}).delta(torch.zeros(32, 16)), up @ down)
    zero = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": scalar(0.0)})
    assert_close(zero.delta(torch.zeros(32, 16)), up @ down)


def test_locon_3x3_conv(rand):
    up, down = rand(32, 8, 1, 1), rand(8, 16, 3, 3)
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": scalar(4.0)})
    expected = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * (4.0 / 8)
    assert_close(layer.delta(torch.zeros(32, 16, 3, 3)), expected)


def test_locon_tucker_matches_the_down_mid_up_conv_chain(rand):
    up, mid, down = rand(32, 4, 1, 1), rand(4, 4, 3, 3), rand(4, 16, 1, 1)
    layer = LoRALayer({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": scalar(1.0)})
    delta = layer.delta(torch.zeros(32, 16, 3, 3))
    assert_close(delta, torch.einsum("or,rshw,si->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) / 4)
    # The einsum's index order is right only if one conv with ΔW equals LoCon's three convs in a row.
    x = rand(1, 16, 8, 8)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) / 4
    assert_close(F.conv2d(x, delta, padding=1), chain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("up_shape", "down_shape", "weight_shape"),
    [
        ((32, 4), (4, 16), (32, 16, 1, 1)),  # linear LoRA on a 1x1 conv proj_in
        ((32, 4, 1, 1), (4, 16, 1, 1), (32, 16, 1, 1)),
        ((32, 4, 1, 1), (4, 16, 1, 1), (32, 16)),  # conv LoRA on a linear proj_in
        ((32, 4, 1, 1), (4, 16), (32, 16)),
    ],
)
def test_lora_1x1_conv_and_linear_layouts_are_interchangeable(rand, up_shape, down_shape, weight_shape):
    up, down = rand(*up_shape), rand(*down_shape)
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down})
    assert layer.shape_error(weight_shape) is None
    expected = (up.reshape(32, 4) @ down.reshape(4, 16)).reshape(weight_shape)
    assert_close(layer.delta(torch.zeros(weight_shape)), expected)


def test_lora_shape_error_names_both_shapes(rand):
    layer = LoRALayer({"lora_up.weight": rand(320, 4), "lora_down.weight": rand(4, 768)})
    assert layer.shape_error((320, 768)) is None
    assert layer.shape_error((320, 1024)) == "ΔW would be (320, 768), module weight is (320, 1024)"
    with pytest.raises(ValueError, match=r"ΔW would be \(320, 768\), module weight is \(320, 1024\)"):
        layer.delta(torch.zeros(320, 1024))


def test_conv_lora_does_not_fit_a_linear_weight_of_the_same_size(rand):
    layer = LoRALayer({"lora_up.weight": rand(32, 4, 1, 1), "lora_down.weight": rand(4, 16, 3, 3)})
    assert layer.shape_error((32, 16, 3, 3)) is None
    assert layer.shape_error((32, 144)) == "ΔW would be (32, 16, 3, 3), module weight is (32, 144)"


def test_lora_factors_that_do_not_fit_together(rand):
    with pytest.raises(ValueError, match="lora layer: factors do not fit together"):
        LoRALayer({"lora_up.weight": rand(32, 8), "lora_down.weight": rand(4, 16)})


# LoHa


def test_loha_linear_is_the_hadamard_product(rand):
    w1a, w1b, w2a, w2b = rand(64, 4), rand(4, 48), rand(64, 4), rand(4, 48)
    tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": scalar(2.0)}
    layer = LoHaLayer(tensors)
    assert_close(layer.delta(torch.zeros(64, 48)), (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4))
    assert layer.rank() == 4 and layer.kind == "loha"


def test_loha_conv_with_flat_factors(rand):
    w1a, w1b, w2a, w2b = rand(32, 4), rand(4, 16 * 9), rand(32, 4), rand(4, 16 * 9)
    layer = LoHaLayer({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b})
    expected = ((w1a @ w1b) * (w2a @ w2b)).reshape(32, 16, 3, 3)
    assert_close(layer.delta(torch.zeros(32, 16, 3, 3)), expected)


def test_loha_tucker(rand):
    t1, w1a, w1b = rand(4, 4, 3, 3), rand(4, 32), rand(4, 16)
    t2, w2a, w2b = rand(4, 4, 3, 3), rand(4, 32), rand(4, 16)
    tensors = {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, "alpha": scalar(8.0)}
    tensors |= {"hada_t2": t2, "hada_w2_a": w2a, "hada_w2_b": w2b}
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    assert_close(LoHaLayer(tensors).delta(torch.zeros(32, 16, 3, 3)), rebuild1 * rebuild2 * 2.0)


def test_loha_tucker_cores_come_in_pairs(rand):
    tensors = {"hada_w1_a": rand(4, 8), "hada_w1_b": rand(4, 8), "hada_w2_a": rand(4, 8), "hada_w2_b": rand(4, 8)}
    with pytest.raises(ValueError, match="hada_t1 and hada_t2"):
        LoHaLayer(tensors | {"hada_t1": rand(4, 4, 3, 3)})


# LoKr


def test_lokr_full_w1_low_rank_w2_scales_by_w2_rank(rand):
    w1, w2a, w2b = rand(4, 8), rand(80, 2), rand(2, 96)
    layer = LoKrLayer({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": scalar(1.0)})
    assert layer.rank() == 2
    assert_close(layer.delta(torch.zeros(320, 768)), torch.kron(w1, w2a @ w2b) * 0.5)


def test_lokr_both_decomposed_scales_by_w1_rank(rand):
    w1a, w1b, w2a, w2b = rand(4, 3), rand(3, 8), rand(80, 3), rand(3, 96)
    tensors = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": scalar(6.0)}
    layer = LoKrLayer(tensors)
    assert layer.rank() == 3
    assert_close(layer.delta(torch.zeros(320, 768)), torch.kron(w1a @ w1b, w2a @ w2b) * 2.0)


def test_lokr_both_full_ignores_alpha(rand):
    w1, w2 = rand(4, 8), rand(80, 96)
    layer = LoKrLayer({"lokr_w1": w1, "lokr_w2": w2, "alpha": scalar(7.0)})
    assert layer.rank() is None
    assert_close(layer.delta(torch.zeros(320, 768)), torch.kron(w1, w2))


def test_lokr_conv_full_w2(rand):
    w1, w2 = rand(2, 4), rand(16, 4, 3, 3)
    layer = LoKrLayer({"lokr_w1": w1, "lokr_w2": w2})
    assert_close(layer.delta(torch.zeros(32, 16, 3, 3)), torch.kron(w1[:, :, None, None], w2))


def test_lokr_conv_flat_w2_equals_the_4d_kron(rand):
    w1, w2a, w2b = rand(2, 4), rand(16, 3), rand(3, 4 * 9)
    layer = LoKrLayer({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": scalar(3.0)})
    w2 = (w2a @ w2b).reshape(16, 4, 3, 3)
    assert_close(layer.delta(torch.zeros(32, 16, 3, 3)), torch.kron(w1[:, :, None, None], w2))


def test_lokr_conv_tucker(rand):
    w1, t2, w2a, w2b = rand(2, 4), rand(3, 3, 3, 3), rand(3, 16), rand(3, 4)
    layer = LoKrLayer({"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": scalar(1.5)})
    w2 = torch.einsum("i j ..., i p, j r -> p r ...", t2, w2a, w2b).contiguous()  # kron refuses this einsum's strides
    assert_close(layer.delta(torch.zeros(32, 16, 3, 3)), torch.kron(w1[:, :, None, None], w2) * 0.5)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"lokr_w2"}, "needs either lokr_w1 or both lokr_w1_a and lokr_w1_b"),
        ({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2"}, "needs either lokr_w1 or both"),
        ({"lokr_w1", "lokr_w2_a"}, "needs either lokr_w2 or both lokr_w2_a and lokr_w2_b"),
    ],
)
def test_lokr_needs_each_side_exactly_once(names, message):
    with pytest.raises(ValueError, match=message):
        LoKrLayer({name: torch.ones(2, 2) for name in names})


# DoRA


def _dora_expected(w0, up, down, scale, magnitude, norm_dims):
    merged = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * scale
    norm = merged.pow(2).sum(dim=norm_dims, keepdim=True).sqrt()
    return magnitude.reshape(norm.shape) * merged / norm - w0


def test_dora_default_orientation_normalises_each_input_column(rand):
    w0, up, down, magnitude = rand(48, 64), rand(48, 4), rand(4, 64), rand(1, 64).abs()
    layer = layer_from_tensors(
        {"lora_up.weight": up, "lora_down.weight": down, "alpha": scalar(2.0), "dora_scale": magnitude}
    )
    assert isinstance(layer, DoRALayer) and layer.kind == "dora" and layer.rank() == 4
    delta = layer.delta(w0)
    assert_close(delta, _dora_expected(w0, up, down, 0.5, magnitude, (0,)))
    assert_close((w0 + delta).norm(dim=0, keepdim=True), magnitude)


def test_dora_output_orientation_normalises_each_output_row(rand):
    w0, up, down, magnitude = rand(48, 64), rand(48, 4), rand(4, 64), rand(48, 1).abs()
    layer = DoRALayer({"lora_up.weight": up, "lora_down.weight": down, "dora_scale": magnitude})
    delta = layer.delta(w0)
    assert_close(delta, _dora_expected(w0, up, down, 1.0, magnitude, (1,)))
    assert_close((w0 + delta).norm(dim=1, keepdim=True), magnitude)


@pytest.mark.parametrize(("magnitude_shape", "norm_dims"), [((1, 16, 1, 1), (0, 2, 3)), ((32, 1, 1, 1), (1, 2, 3))])
def test_dora_conv_both_orientations(rand, magnitude_shape, norm_dims):
    w0, up, down, magnitude = rand(32, 16, 3, 3), rand(32, 4, 1, 1), rand(4, 16, 3, 3), rand(*magnitude_shape).abs()
    layer = DoRALayer({"lora_up.weight": up, "lora_down.weight": down, "dora_scale": magnitude, "alpha": scalar(8.0)})
    assert_close(layer.delta(w0), _dora_expected(w0, up, down, 2.0, magnitude, norm_dims))


def test_dora_over_loha(rand):
    w0, magnitude = rand(24, 40), rand(1, 40).abs()
    loha = {"hada_w1_a": rand(24, 2), "hada_w1_b": rand(2, 40), "hada_w2_a": rand(24, 2), "hada_w2_b": rand(2, 40)}
    merged = w0 + LoHaLayer(loha).delta(w0)
    layer = layer_from_tensors(loha | {"dora_scale": magnitude})
    assert_close(layer.delta(w0), magnitude * merged / merged.norm(dim=0, keepdim=True) - w0)


def test_dora_scale_that_fits_neither_orientation(rand):
    layer = DoRALayer({"lora_up.weight": rand(48, 4), "lora_down.weight": rand(4, 64), "dora_scale": rand(1, 48)})
    assert (
        layer.shape_error((48, 64)) == "dora_scale is (1, 48), expected (1, 64) or (48, 1) for module weight (48, 64)"
    )
    with pytest.raises(ValueError, match="dora_scale is"):
        layer.delta(torch.zeros(48, 64))


def test_dora_cannot_wrap_a_full_diff(rand):
    with pytest.raises(ValueError, match="not full"):
        layer_from_tensors({"diff": rand(4, 4), "dora_scale": rand(1, 4)})


# Full diff


def test_full_diff_is_the_stored_diff_and_bias(rand):
    diff, diff_b = rand(32, 16, 3, 3), rand(32)
    layer = FullLayer({"diff": diff, "diff_b": diff_b})
    delta = layer.delta(torch.zeros(32, 16, 3, 3))
    assert torch.equal(delta, diff) and torch.equal(layer.bias_delta(), diff_b)
    delta.mul_(0)  # the caller owns the result: scaling it in place leaves the layer intact
    assert torch.equal(layer.delta(torch.zeros(32, 16, 3, 3)), diff)
    assert layer.rank() is None and layer.shape_error((32, 16, 3, 1)) is not None


def test_only_full_diffs_carry_a_bias_delta(rand):
    assert FullLayer({"diff": rand(4, 4)}).bias_delta() is None
    assert LoRALayer({"lora_up.weight": rand(4, 2), "lora_down.weight": rand(2, 4)}).bias_delta() is None


# Picking a class, storage


@pytest.mark.parametrize(
    ("names", "cls"),
    [
        ({"lora_up.weight", "lora_down.weight", "alpha"}, LoRALayer),
        ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, LoHaLayer),
        ({"lokr_w1", "lokr_w2"}, LoKrLayer),
        ({"lora_up.weight", "lora_down.weight", "dora_scale"}, DoRALayer),
        ({"diff"}, FullLayer),
    ],
)
def test_layer_from_tensors_picks_the_class(names, cls):
    tensors = {name: torch.ones(1, 4) if name == "dora_scale" else torch.ones(4, 4) for name in names - {"alpha"}}
    assert type(layer_from_tensors(tensors | ({"alpha": scalar(4.0)} if "alpha" in names else {}))) is cls
    assert names <= LAYER_SUFFIXES


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"lora_up.weight", "lora_down.weight", "bias_indices"}, "unknown layer suffixes bias_indices"),
        ({"lora_down.weight", "alpha"}, r"lora layer: missing lora_up.weight \(has alpha, lora_down.weight\)"),
        ({"lora_up.weight", "lora_down.weight", "hada_w1_a"}, "lora layer: unexpected hada_w1_a"),
        ({"alpha"}, "no layer tensors, only alpha"),
        ({"dora_scale"}, "no layer tensors"),
    ],
)
def test_layer_from_tensors_rejects_with_a_one_line_message(names, message):
    with pytest.raises(ValueError, match=message) as error:
        layer_from_tensors({name: torch.ones(4, 4) for name in names})
    assert "\n" not in str(error.value)


def test_factors_keep_the_files_dtype_stay_low_rank_and_build_in_fp32(rand):
    up, down = rand(320, 4).half(), rand(4, 768).half()
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(4.0).half()})
    # fp16 as in the file, not an fp32 copy; alpha is folded into the scale, no tensor kept for it
    assert layer.nbytes() == (4 * 768 + 320 * 4) * 2 and set(layer._tensors) == {"lora_up.weight", "lora_down.weight"}
    assert layer.to("cpu") is layer and layer.to(torch.device("cpu")) is layer
    assert all(t.dtype == torch.float16 for t in layer._tensors.values())
    delta = layer.delta(torch.zeros(320, 768))
    assert delta.dtype == torch.float32
    assert torch.equal(delta, up.float() @ down.float())
    target = torch.zeros(320, 768)
    layer.add_to(target, alpha=0.5)
    assert torch.equal(target, torch.zeros(320, 768).addmm_(up.float(), down.float(), alpha=0.5))


def test_a_full_diff_in_fp16_gives_fp32_deltas_without_touching_the_stored_diff(rand):
    diff, diff_b = rand(8, 4).half(), rand(8).half()
    layer = FullLayer({"diff": diff, "diff_b": diff_b})
    delta = layer.delta(torch.zeros(8, 4))
    delta.mul_(2)
    assert delta.dtype == torch.float32 and torch.equal(layer.delta(torch.zeros(8, 4)), diff.float())
    assert layer.bias_delta().dtype == torch.float32 and torch.equal(layer.bias_delta(), diff_b.float())


def test_dora_bytes_and_device_move_include_the_inner_layer(rand):
    tensors = {"lora_up.weight": rand(32, 4), "lora_down.weight": rand(4, 16), "dora_scale": rand(1, 16).half()}
    layer = DoRALayer(tensors)
    assert layer.nbytes() == (32 * 4 + 4 * 16) * 4 + 16 * 2
    assert layer.to("cpu") is layer
    assert layer._tensors["dora_scale"].dtype == torch.float16


def test_alpha_must_be_one_number(rand):
    with pytest.raises(ValueError, match=r"lora layer: alpha must be a single number, got shape \(2,\)"):
        LoRALayer({"lora_up.weight": rand(4, 2), "lora_down.weight": rand(2, 4), "alpha": rand(2)})
    layer = LoRALayer({"lora_up.weight": rand(4, 2), "lora_down.weight": rand(2, 4), "alpha": torch.tensor([1.0])})
    assert layer.rank() == 2


# --- what the classes say from shapes alone ------------------------------------------------------------------------


def test_the_registry_is_the_classes_and_each_suffix_has_one_owner():
    classes = (*LAYER_TYPES, *WRAPPERS)
    assert LAYER_TYPES == (LoRALayer, LoHaLayer, LoKrLayer, FullLayer) and WRAPPERS == (DoRALayer,)
    owned = [suffix for cls in classes for suffix in cls.suffixes() - {"alpha"}]
    assert len(owned) == len(set(owned)) and set(owned) | {"alpha"} == LAYER_SUFFIXES
    assert sorted(REPORTED_KINDS) == sorted([*(cls.kind for cls in classes), "locon"])  # locon: LoRA over a kernel
    assert all(set(cls.min_dims) <= cls.suffixes() for cls in classes)
    assert [min_dims(s) for s in ("lora_down.weight", "lora_mid.weight", "hada_t1", "lokr_t2", "diff_b")] == [
        2,
        4,
        4,
        4,
        1,
    ]
    assert min_dims("dora_scale") == 1


class _Shape:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)


@pytest.mark.parametrize(
    ("shapes", "weight", "kinds"),
    [
        ({"lora_up.weight": (32, 4), "lora_down.weight": (4, 16)}, (32, 16), ("lora",)),
        ({"lora_up.weight": (32, 4, 1, 1), "lora_down.weight": (4, 8, 3, 3)}, (32, 8, 3, 3), ("lora",)),
        (
            {"lora_up.weight": (32, 4, 1, 1), "lora_down.weight": (4, 8, 1, 1), "lora_mid.weight": (4, 4, 3, 3)},
            (32, 8, 3, 3),
            ("lora",),
        ),
        (
            {"hada_w1_a": (32, 4), "hada_w1_b": (4, 72), "hada_w2_a": (32, 4), "hada_w2_b": (4, 72)},
            (32, 8, 3, 3),
            ("loha",),
        ),
        (
            {
                "hada_w1_a": (4, 32),
                "hada_w1_b": (4, 8),
                "hada_w2_a": (4, 32),
                "hada_w2_b": (4, 8),
                "hada_t1": (4, 4, 3, 3),
                "hada_t2": (4, 4, 3, 3),
            },
            (32, 8, 3, 3),
            ("loha",),
        ),
        ({"lokr_w1": (4, 2), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}, (32, 16), ("lokr",)),
        ({"lokr_w1_a": (4, 5), "lokr_w1_b": (5, 2), "lokr_w2": (8, 8)}, (32, 16), ("lokr",)),
        ({"lokr_w1": (4, 2), "lokr_w2": (8, 8)}, (32, 16), ("lokr",)),
        ({"diff": (32, 16), "diff_b": (32,)}, (32, 16), ("full",)),
        ({"lora_up.weight": (32, 4), "lora_down.weight": (4, 16), "dora_scale": (1, 16)}, (32, 16), ("dora", "lora")),
    ],
)
def test_rank_and_widths_from_shapes_are_the_layers_own(shapes, weight, kinds):
    tensors = {name: torch.rand(shape) for name, shape in shapes.items()}
    layer = layer_from_tensors(tensors)
    headers = {name: _Shape(t) for name, t in tensors.items()}  # what a safetensors header gives inspection
    assert rank_of(headers) == layer.rank() and layer_kinds(headers) == kinds
    out, flat = delta_dims(headers)
    made = layer.delta(torch.zeros(weight)).shape
    assert (out, flat) == (made[0], made[1:].numel()) and layer.shape_error(weight) is None


def test_widths_from_partial_shapes_say_what_they_can():
    assert delta_dims({"lora_up.weight": _Shape(torch.empty(32, 4))}) == (32, None)
    assert delta_dims({"diff_b": _Shape(torch.empty(32))}) == (32, None)
    assert delta_dims({"hada_w2_a": _Shape(torch.empty(32, 4))}) == (None, None)
    assert delta_dims({"alpha": _Shape(torch.empty(()))}) == (None, None) and rank_of({}) is None
