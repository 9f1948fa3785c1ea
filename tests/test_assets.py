"""Asset discovery and inspection: trigger naming, collisions, formats and bases, refusals, pickles, --list."""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from batchgen.assets.embeddings import find_embeddings, inspect_embedding
from batchgen.assets.hashing import HashCache
from batchgen.errors import BatchgenError
from batchgen.tiny import tiny_root


def _ti_files(folder: Path) -> dict[str, Path]:
    """One TI in every layout, with known widths and vector counts."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "a1111": folder / "oldschool.pt",
        "diffusers": folder / "sketchy" / "learned_embeds.bin",
        "emb_params": folder / "twovec.safetensors",
        "sdxl": folder / "xl_style.safetensors",
        "sd2": folder / "wide.safetensors",
        "nested": folder / "wrapped.ckpt",
    }
    files["diffusers"].parent.mkdir()
    torch.save({"string_to_param": {"*": torch.ones(3, 768)}, "name": "oldschool", "step": 1}, files["a1111"])
    torch.save({"<sketchy>": torch.ones(768)}, files["diffusers"])
    save_file({"emb_params": torch.ones(2, 768)}, files["emb_params"])
    save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, files["sdxl"])
    save_file({"emb_params": torch.ones(1, 1024)}, files["sd2"])
    torch.save({"state_dict": {"string_to_param": {"*": torch.ones(4, 768)}}}, files["nested"])
    return files


def test_trigger_names_formats_vectors_and_bases(tmp_path: Path) -> None:
    _ti_files(tmp_path / "ti")
    found, refused = find_embeddings([tmp_path / "ti"], "models.m.embeddings")
    assert refused == ()
    inspected = {ti.trigger: inspect_embedding(ti, HashCache(None)) for ti in found}
    summary = {t: (ti.format, ti.vectors, ti.base) for t, ti in inspected.items()}
    assert summary == {
        "oldschool": ("a1111", 3, "sd-1"),
        "sketchy": ("diffusers", 1, "sd-1"),  # learned_embeds.bin takes its folder's name
        "twovec": ("emb_params", 2, "sd-1"),
        "xl_style": ("sdxl", 1, "sdxl"),
        "wide": ("emb_params", 1, "sd-2"),
        "wrapped": ("a1111", 4, "sd-1"),  # .ckpt-style {"state_dict": ...} nesting
    }
    assert all(len(ti.sha256) == 64 for ti in inspected.values())


def test_two_files_claiming_one_trigger_is_an_error_naming_both(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_file({"emb_params": torch.ones(1, 768)}, tmp_path / sub / "dup.safetensors")
    with pytest.raises(BatchgenError) as caught:
        find_embeddings([tmp_path], "models.m.embeddings")
    assert str(caught.value) == (
        f"models.m.embeddings: two embeddings claim the trigger <dup>: {tmp_path / 'a' / 'dup.safetensors'} and "
        f"{tmp_path / 'b' / 'dup.safetensors'}; rename one of them or name its trigger in the model config"
    )


def test_config_can_name_a_trigger_and_bad_names_are_refused(tmp_path: Path) -> None:
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "my style!.safetensors")
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "odd+name.safetensors")
    found, refused = find_embeddings([tmp_path], "w", named={"my style!.safetensors": "<mystyle>"})
    assert [ti.trigger for ti in found] == ["mystyle"]
    assert [(r.name, r.reason) for r in refused] == [
        ("odd+name", "trigger <odd+name> has characters outside [a-zA-Z0-9., _-]; rename the file")
    ]


def test_not_an_embedding_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "x.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(BatchgenError, match=r"x.safetensors: not a textual inversion \(tensors: a, b\)"):
        inspect_embedding(find_embeddings([tmp_path / "x.safetensors"], "w")[0][0], HashCache(None))
    with pytest.raises(BatchgenError, match=r"empty.safetensors: not a readable safetensors file"):
        inspect_embedding(find_embeddings([tmp_path / "empty.safetensors"], "w")[0][0], HashCache(None))


class _Payload:
    """Unpickling this would create a file: the marker proves whether foreign code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["embedding", "lora"])
def test_pickle_that_would_run_code_is_refused(run_cli, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": _Payload(marker)}}))
    if kind == "embedding":
        args = ("+sweep=styles", f"models.tiny_sd1.embeddings=[{folder}]", "sweep.prompts=['<evil> cat']")
    else:
        args = ("+sweep=styles", f"models.tiny_sd1.loras=[{folder}]", "+sweep.stacks.bad={evil: 1.0}")
    code, _, err = run_cli(*args, "sweep.models=[tiny_sd1]")
    assert code == 2
    assert err.startswith(f"batchgen: error: {folder / 'evil.pt'}: refused, the pickle would run code")
    assert err.rstrip().endswith("use a .safetensors version of this file")
    assert not marker.exists()
    assert not Path("runs").exists()


def test_ti_of_another_base_is_refused_listed_and_skipped(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tmp_path / "ti"
    _ti_files(folder)
    sdxl_ti = tiny_root("tiny_sdxl", tiny_cache) / "embedding"
    args = (
        "+sweep=styles",
        f"models.tiny_sd1.embeddings=[{folder}]",
        f"models.tiny_sdxl.embeddings=[{folder},{sdxl_ti}]",
    )
    code, out, _ = run_cli(*args, "--list")
    assert code == 0
    lines = out.splitlines()
    assert f"  embedding  <oldschool>  a1111, 3 vectors, sd-1  {folder / 'oldschool.pt'}" in lines
    assert f"  embedding  <twovec>  emb_params, 2 vectors, sd-1  {folder / 'twovec.safetensors'}" in lines
    assert (
        f"  refused embedding  <oldschool>  {folder / 'oldschool.pt'}: "
        "embedding <oldschool> is sd-1, model tiny_sdxl is sdxl"
    ) in lines
    assert (
        f"  refused embedding  <wide>  {folder / 'wide.safetensors'}: embedding <wide> is sd-2, model tiny_sd1 is sd-1"
        in lines
    )
    lora_lines = [line for line in lines if line.startswith("  lora  ")]
    assert len(lora_lines) == 12  # six LoRAs for each tiny model
    assert any(line.startswith("  lora  hatch  kohya LoHa, rank 4, sdxl, text_encoder ") for line in lora_lines)
    assert any(line.startswith("  lora  peft_sketch  PEFT/diffusers LoRA, rank 4, sd-1, ") for line in lora_lines)

    code, _, _ = run_cli(*args, "sweep.prompts=['<oldschool> cat']", "sweep.seeds=[1]", "sweep.stacks={}")
    assert code == 0
    table = pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    skipped = table[table["status"] == "skipped"]
    assert set(skipped["model"]) == {"tiny_sdxl"}
    assert set(skipped["error"]) == {"embedding <oldschool> is sd-1, model tiny_sdxl is sdxl"}
    assert set(table.loc[table["status"] == "ok", "model"]) == {"tiny_sd1"}


def test_lora_of_another_base_skips_the_stack(run_cli, tiny_cache: Path) -> None:
    sd1_loras = tiny_root("tiny_sd1", tiny_cache) / "lora"
    code, out, _ = run_cli(
        "+sweep=styles", f"models.tiny_sdxl.loras=[{sd1_loras}]", "sweep.prompts=[a castle]", "--dry-run"
    )
    assert code == 0
    # every stack with a LoRA is skipped on SDXL (the files are SD1 there): 5 states x 2 seeds
    assert "  skipped 4: LoRA 'ink' is sd-1, model tiny_sdxl is sdxl\n" in out
    assert "  skipped 2: LoRA 'peft_sketch' is sd-1, model tiny_sdxl is sdxl\n" in out
    assert "jobs: 14 to render in total, 14 new, 0 already done, 10 skipped" in out


def _kohya_pair(name: str, out_features: int, in_features: int, rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": torch.ones(rank, in_features),
        f"{name}.lora_up.weight": torch.ones(out_features, rank),
        f"{name}.alpha": torch.tensor(1.0),
    }


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            _kohya_pair("lora_unet_down_blocks_9_attentions_0_proj_in", 32, 32),
            "1 of 1 layers map to no module of this sd-1 model, e.g. lora_unet_down_blocks_9_attentions_0_proj_in",
        ),
        (
            _kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 33),
            "1 of 1 layers map to no module of this sd-1 model, e.g. lora_unet_down_blocks_0_attentions_0_transf",
        ),
        ({"lora_unet_x.lora_down.weight": torch.ones(1, 1), "something_else": torch.ones(1)}, "something_else"),
    ],
)
def test_lora_keys_that_fit_no_module_are_an_error(run_cli, tmp_path: Path, tensors: dict, message: str) -> None:
    save_file(tensors, tmp_path / "wrong.safetensors")
    code, _, err = run_cli(
        "+sweep=styles", f"models.tiny_sd1.loras=[{tmp_path}]", "sweep.models=[tiny_sd1]", "+sweep.stacks.w={wrong: 1}"
    )
    assert code == 2
    assert err.startswith(f"batchgen: error: {tmp_path / 'wrong.safetensors'}: ")
    assert message in err and err.count("\n") == 1


def test_kohya_training_tags_are_summarised() -> None:
    from batchgen.assets.loras import _top_tags

    metadata = {"ss_tag_frequency": '{"set1": {"ink": 5, " cat": 2}, "set2": {"ink": 1, "dog": 4}}'}
    assert _top_tags(metadata, count=2) == "ink, dog"
    assert _top_tags({"ss_tag_frequency": "not json"}) == ""


def test_bases_read_from_widths_with_the_messages_users_see(tmp_path: Path) -> None:
    from batchgen.assets.bases import BASE_NAMES, cross_attention_base, embedding_base, listing

    path = tmp_path / "ti.pt"
    assert BASE_NAMES == ("sd-1", "sd-2", "sdxl", "sd-3", "flux")
    assert [embedding_base(w, path) for w in ([768], [1024], [768, 1280])] == ["sd-1", "sd-2", "sdxl"]
    assert [cross_attention_base(w) for w in (768, 1024, 2048, 1280)] == ["sd-1", "sd-2", "sdxl", None]
    with pytest.raises(BatchgenError) as error:
        embedding_base([640], path)
    assert str(error.value) == f"{path}: vector width 640 matches no SD version (768 sd-1, 1024 sd-2)"
    with pytest.raises(BatchgenError) as error:
        embedding_base([768, 1024], path)
    assert str(error.value) == f"{path}: clip_l/clip_g widths [768, 1024] are not SDXL's 768 and 1280"
    assert listing(["SD1 (768)", "SD2 (1024)", "SDXL (2048)"]) == "SD1 (768), SD2 (1024) or SDXL (2048)"
    assert listing(["a"]) == "a" and listing(["a", "b"]) == "a or b"


def test_list_names_a_refused_files_path_once(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "empty.safetensors").write_bytes(b"")
    loras = f"models.tiny_sd1.loras=[{tiny_root('tiny_sd1', tiny_cache) / 'lora'},{folder}]"
    code, out, err = run_cli("+sweep=styles", loras, "sweep.models=[tiny_sd1]", "--list")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("  refused lora  empty  ")]
    assert line.count(str(folder / "empty.safetensors")) == 1
    assert line.startswith(f"  refused lora  empty  {folder / 'empty.safetensors'}: ")


OTHER_BASE_LORAS = {
    # kohya FLUX (sd-scripts), BFL/ComfyUI FLUX, diffusers FLUX, XLabs FLUX, kohya SD3, SGM/ComfyUI SD3,
    # diffusers SD3-or-FLUX
    "flux_kohya": ("lora_unet_double_blocks_0_img_attn_qkv", "flux"),
    "flux_bfl": ("diffusion_model.single_blocks.3.linear1", "flux"),
    "flux_diffusers": ("transformer.single_transformer_blocks.0.attn.to_q", "flux"),
    "flux_xlabs": ("double_blocks.0.processor.proj_lora1", "flux"),
    "sd3_kohya": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "sd-3"),
    "sd3_sgm": ("diffusion_model.joint_blocks.0.context_block.mlp.fc1", "sd-3"),
    "dit_diffusers": ("transformer.transformer_blocks.0.attn.add_q_proj", "flux or sd-3"),
}


# Each layout's own LoRA suffixes: XLabs processors, diffusers/PEFT, kohya and BFL.
SUFFIXES = {
    "processor": ("down.weight", "up.weight"),
    "transformer.": ("lora_A.weight", "lora_B.weight"),
    "_": ("lora_down.weight", "lora_up.weight"),
}


def test_loras_of_mmdit_bases_are_refused_on_unet_models_and_skip_their_jobs(
    run_cli, tmp_path: Path, tiny_cache: Path
) -> None:
    folder = tmp_path / "dit"
    folder.mkdir()
    for name, (module, _) in OTHER_BASE_LORAS.items():
        down, up = SUFFIXES[next(kind for kind in SUFFIXES if kind in module)]
        tensors = {f"{module}.{down}": torch.ones(2, 64), f"{module}.{up}": torch.ones(64, 2)}
        save_file(tensors, str(folder / f"{name}.safetensors"))
    own = tiny_root("tiny_sdxl", tiny_cache) / "lora"
    args = ("+sweep=styles", f"models.tiny_sdxl.loras=[{folder},{own}]", f"models.tiny_sd1.loras=[{folder}]")
    code, out, err = run_cli(*args, "--list")
    assert code == 0, err
    for name, (_, base) in OTHER_BASE_LORAS.items():
        for model, model_base in (("tiny_sd1", "sd-1"), ("tiny_sdxl", "sdxl")):
            assert (
                f"  refused lora  {name}  {folder / f'{name}.safetensors'}: LoRA '{name}' is {base}, model {model} "
                f"is {model_base}"
            ) in out.splitlines(), out
    # a stack naming one is skipped on the model that has it; every other job renders
    stack = "+sweep.stacks.f={flux_kohya: 1.0}"
    code, out, err = run_cli(*args, stack, "sweep.prompts=[a castle]", "sweep.seeds=[1]", "--dry-run")
    assert err == (
        "batchgen: error: sweep.stacks.f: LoRA 'flux_kohya' is flux, and no model of this sweep is (tiny_sd1 is sd-1, "
        "tiny_sdxl is sdxl); remove it from the stack or render a flux model\n"
    )
    assert code == 2 and out == ""
