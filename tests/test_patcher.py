"""The fused weight patcher: exact restore, A -> B -> A, minimal touching, text encoders, low-rank memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchgen.config import compose_config
from batchgen.engine.pipeline import LoraStacks, load_pipeline
from batchgen.plan.lora_state import lora_state
from batchgen.runner import prepare
from batchgen.spec import Contribution, LoraState, LoraWeight


@pytest.fixture(scope="module")
def loaded(tiny_cache: Path):
    """The tiny SDXL pipeline (two text encoders) with every tiny LoRA registered in a LoraStacks."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    plan = prepare(compose_config(["+sweep=styles"]), all_assets=True)
    spec = plan.models["tiny_sdxl"]
    pipe = load_pipeline(spec, "cpu", torch.float32)
    yield pipe, _Stacks(LoraStacks(pipe, spec), spec), spec
    torch.set_num_threads(previous)


class _Stacks:
    """LoraStacks taking a stack as the planner writes it: its state is built by the planner's own function."""

    def __init__(self, stacks: LoraStacks, spec) -> None:
        self.stacks, self.spec = stacks, spec

    def use(self, loras: tuple[LoraWeight, ...]) -> None:
        self.stacks.use(lora_state(loras, self.spec))

    def __getattr__(self, name: str):
        return getattr(self.stacks, name)


def _snapshot(stacks: LoraStacks) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in stacks.components.items()
        for key, value in module.state_dict().items()
    }


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _unet(name: str, weight: float) -> LoraState:
    return LoraState((("unet", (Contribution(name, weight),)),))


def _stack(*weights: tuple[str, float] | tuple[str, float, float]) -> tuple[LoraWeight, ...]:
    return tuple(LoraWeight(w[0], w[1], w[-1]) for w in sorted(weights))


def test_every_tiny_lora_format_is_usable(loaded) -> None:
    _, _, spec = loaded
    formats = {lora.name: lora.format for lora in spec.loras}
    assert formats["ink"] == "kohya+lora" and formats["peft_sketch"] == "peft+lora"
    assert formats["hatch"] == "kohya+loha" and formats["kron"] == "kohya+lokr"


def test_removing_all_loras_restores_bitwise_after_any_sequence(loaded) -> None:
    _, stacks, _ = loaded
    original = _snapshot(stacks)
    for stack in (
        _stack(("ink", 1.0)),
        _stack(("ink", 0.5), ("grain", 0.6)),
        _stack(("hatch", 0.7), ("kron", -0.4, 1.3)),
        _stack(("peft_sketch", 1.0), ("pastel", 0.3)),
        _stack(("grain", 2.0, 0.0)),
    ):
        stacks.use(stack)
        assert _snapshot(stacks).keys() == original.keys()
    stacks.use(())
    _assert_bitwise_equal(_snapshot(stacks), original)


def test_a_b_a_is_bitwise_a(loaded) -> None:
    _, stacks, _ = loaded
    a = _stack(("ink", 0.8), ("grain", 0.6), ("kron", 0.5))
    b = _stack(("ink", 0.3), ("hatch", 1.0))
    stacks.use(a)
    weights_a = _snapshot(stacks)
    stacks.use(b)
    assert any(not torch.equal(v, weights_a[k]) for k, v in _snapshot(stacks).items())
    stacks.use(a)
    _assert_bitwise_equal(_snapshot(stacks), weights_a)
    stacks.use(())


def test_only_modules_whose_deltas_change_are_touched(loaded) -> None:
    _, stacks, _ = loaded
    patcher = stacks.patcher
    stacks.use(_stack(("ink", 0.5)))
    stacks.use(_stack(("ink", 0.5), ("grain", 0.6)))
    assert patcher.touched_last == len(patcher.loras["grain"])  # ink's modules outside grain's stay as they are
    stacks.use(_stack(("ink", 0.7), ("grain", 0.6)))
    assert patcher.touched_last == len(patcher.loras["ink"])
    stacks.use(_stack(("ink", 0.7, 0.0), ("grain", 0.6)))  # only ink's text-encoder weight changed
    assert patcher.touched_last == sum(1 for ref in patcher.loras["ink"] if ref.component != "unet")
    stacks.use(())


def test_text_encoders_are_patched_and_split_weights_respected(loaded) -> None:
    _, stacks, _ = loaded
    original = _snapshot(stacks)
    stacks.use(_stack(("ink", 1.0)))
    patched = _snapshot(stacks)
    changed = {k.split(".")[0] for k in original if not torch.equal(original[k], patched[k])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
    stacks.use(_stack(("ink", 1.0, 0.0)))
    unet_only = _snapshot(stacks)
    changed = {k.split(".")[0] for k in original if not torch.equal(original[k], unet_only[k])}
    assert changed == {"unet"}
    stacks.use(())


def test_patched_weight_follows_the_sum_formula(loaded) -> None:
    _, stacks, _ = loaded
    patcher = stacks.patcher
    stacks.use(_stack(("ink", 0.5), ("grain", -0.25)))
    shared = next(ref for ref in patcher.loras["ink"] if ref in patcher.loras["grain"])
    module = stacks.components[shared.component].get_submodule(shared.path)
    w0 = patcher.pristine.get(shared, "weight").float()
    expected = w0 + 0.5 * patcher.loras["ink"][shared].delta(w0) - 0.25 * patcher.loras["grain"][shared].delta(w0)
    torch.testing.assert_close(module.weight, expected, rtol=0, atol=1e-6)
    stacks.use(())


def test_loras_are_kept_low_rank(loaded) -> None:
    _, stacks, spec = loaded
    stacks.use(_stack(("ink", 1.0), ("grain", 1.0)))
    for name in ("ink", "grain"):
        held = sum(layer.nbytes() for layer in stacks.patcher.loras[name].values())
        full = sum(
            stacks.components[ref.component].get_submodule(ref.path).weight.numel() * 4
            for ref in stacks.patcher.loras[name]
        )
        assert held <= spec.lora(name).path.stat().st_size  # the factors, not full-size deltas
        assert held < full / 4
    stacks.use(())


def test_bias_deltas_never_accumulate_into_the_pristine_copy() -> None:
    from batchgen.assets.architecture import ModuleRef
    from batchgen.assets.lora_layers import FullLayer
    from batchgen.engine.patcher import WeightPatcher

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    b0 = model[0].bias.detach().clone()
    patcher = WeightPatcher({"unet": model})
    patcher.add("full", {ModuleRef("unet", "0"): FullLayer({"diff": torch.zeros(2, 2), "diff_b": torch.ones(2)})})
    for weight in (1.0, 0.6, -2.0):
        patcher.apply(_unet("full", weight))
        assert torch.equal(model[0].bias, b0 + weight)
    patcher.restore()
    assert torch.equal(model[0].bias, b0)


def test_a_bias_a_full_diff_changed_is_restored_when_a_plain_lora_takes_the_module_over() -> None:
    from batchgen.assets.architecture import ModuleRef
    from batchgen.assets.lora_layers import FullLayer, LoRALayer
    from batchgen.engine.patcher import WeightPatcher

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    ref = ModuleRef("unet", "0")
    patcher = WeightPatcher({"unet": model})
    patcher.add("full", {ref: FullLayer({"diff": torch.zeros(2, 2), "diff_b": torch.ones(2)})})
    up, down = torch.ones(2, 1), torch.full((1, 2), 0.5)
    patcher.add("lora", {ref: LoRALayer({"lora_up.weight": up, "lora_down.weight": down})})
    bias_reads = []
    restore_into = patcher.pristine.restore_into
    patcher.pristine.restore_into = lambda r, name, dest: (
        bias_reads.append(name == "bias"),
        restore_into(r, name, dest),
    )
    patcher.apply(_unet("lora", 0.3))
    patcher.apply(_unet("lora", 0.7))
    # The first patch finds W0 in place and reads nothing; the second restores the weight only: a bias no layer
    # changed is left alone, not re-read.
    assert bias_reads == [False]
    patcher.apply(_unet("full", 1.0))
    assert torch.equal(model[0].bias, b0 + 1)
    patcher.apply(_unet("lora", 1.0))
    assert bias_reads.count(True) == 1  # the full diff changed it: restored once
    assert torch.equal(model[0].bias, b0) and torch.equal(model[0].weight, w0 + up @ down)
    patcher.apply(_unet("lora", 0.5))
    assert torch.equal(model[0].bias, b0)
    patcher.restore()
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0)


def test_cpu_pristine_weights_come_from_the_checkpoint_not_ram(loaded) -> None:
    _, stacks, _ = loaded
    stacks.use(_stack(("ink", 1.0), ("hatch", 0.5), ("kron", 0.5), ("peft_sketch", 1.0)))
    store = stacks.patcher.pristine
    touched = {ref for name in ("ink", "hatch", "kron", "peft_sketch") for ref in stacks.patcher.loras[name]}
    assert touched and all(ref in store for ref in touched)
    assert store.held_bytes() == 0  # every original found bit-exact in the safetensors files (all 3 components)
    stacks.use(())


def test_pristine_falls_back_to_a_copy_when_the_file_differs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from batchgen.assets.architecture import ModuleRef
    from batchgen.engine.pristine import PristineStore

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    (tmp_path / "unet").mkdir()
    save_file(
        {"0.weight": model[0].weight.detach() + 1, "0.bias": model[0].bias.detach()},
        tmp_path / "unet" / "m.safetensors",
    )
    store = PristineStore(tmp_path, {"unet": model})
    ref = ModuleRef("unet", "0")
    store.keep(ref, model[0])
    assert store.held_bytes() == 3 * 2 * 4  # the weight differs from the file: kept in RAM; the bias did not
    assert torch.equal(store.get(ref, "weight"), model[0].weight) and torch.equal(
        store.get(ref, "bias"), model[0].bias
    )


def test_pristine_compares_bits_so_a_signed_zero_is_not_taken_for_the_original(tmp_path: Path) -> None:
    # torch.equal(-0.0, 0.0) is True, but restoring 0.0 into a weight that held -0.0 would change its bits.
    from safetensors.torch import save_file

    from batchgen.assets.architecture import ModuleRef
    from batchgen.engine.pristine import PristineStore

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0
    on_disk = model[0].weight.detach().clone()
    on_disk[0, 0] = 0.0
    (tmp_path / "unet").mkdir()
    save_file({"0.weight": on_disk, "0.bias": model[0].bias.detach()}, tmp_path / "unet" / "m.safetensors")
    store = PristineStore(tmp_path, {"unet": model})
    ref = ModuleRef("unet", "0")
    store.keep(ref, model[0])
    assert store.held_bytes() == 3 * 2 * 4  # the weight kept in RAM, the bias found on disk
    assert torch.equal(store.get(ref, "weight").view(torch.int32), model[0].weight.detach().view(torch.int32))


def test_a_stack_on_unpatched_modules_reads_no_weight_back(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    _, stacks, _ = loaded
    stacks.use(_stack(("ink", 1.0)))
    stacks.use(())  # every ink module has been kept once, and holds W0 again
    reads: list[tuple[str, str]] = []
    restore_into = stacks.patcher.pristine.restore_into
    monkeypatch.setattr(
        stacks.patcher.pristine,
        "restore_into",
        lambda ref, name, dest: reads.append((ref.path, name)) or restore_into(ref, name, dest),
    )
    stacks.use(_stack(("ink", 1.0)))
    assert reads == []
    stacks.use(())
    assert len(reads) == len(stacks.patcher.loras["ink"])


def test_a_write_that_fails_part_way_is_restored_by_the_next(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    _, stacks, _ = loaded
    stacks.use(())
    original = _snapshot(stacks)
    stacks.use(_stack(("ink", 0.5)))
    half = _snapshot(stacks)
    layer = next(iter(stacks.patcher.loras["ink"].values()))

    def half_written(target: torch.Tensor, alpha: float) -> None:
        target.add_(1.0)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(layer, "add_to", half_written)
    with pytest.raises(RuntimeError, match="out of memory"):
        stacks.use(_stack(("ink", 1.0)))
    monkeypatch.undo()
    assert stacks.current is None
    stacks.use(_stack(("ink", 0.5)))  # back to the stack before the failure: its bits, not the half-written ones
    _assert_bitwise_equal(_snapshot(stacks), half)
    stacks.use(())
    _assert_bitwise_equal(_snapshot(stacks), original)
