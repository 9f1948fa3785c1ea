"""A corpus of bad inputs: each exits 2 with one line naming the file or key and the fix, before any model loads,
with no traceback, no manifest row, and an existing run directory left byte for byte as it was.

Every case builds its own files under tmp_path; the sweep (`+sweep=bad` from a --config-dir) renders one prompt on
the tiny SD1 model, and each case points the model's LoRA or embedding folder at its bad file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen.tiny import tiny_root

SWEEP = """# @package _global_
defaults:
  - /model@models.tiny_sd1: tiny_sd1
sweep:
  name: bad
  prompts: ["a castle"]
  stacks: {none: {}}
  steps: 2
  width: 64
  height: 64
"""


class Case:
    """What a case sets up: extra CLI args, and the message the single error line must hold."""

    def __init__(self, tmp: Path, cache: Path) -> None:
        self.tmp = tmp
        self.sd1 = tiny_root("tiny_sd1", cache)
        self.sdxl = tiny_root("tiny_sdxl", cache)
        self.loras = tmp / "loras"
        self.tis = tmp / "tis"
        self.loras.mkdir()
        self.tis.mkdir()

    def lora_args(self, name: str = "bad") -> list[str]:
        return [f"models.tiny_sd1.loras=[{self.loras}]", f"+sweep.stacks.s={{{name}: 1.0}}"]

    def ti_args(self, trigger: str = "bad") -> list[str]:
        return [f"models.tiny_sd1.embeddings=[{self.tis}]", f"sweep.prompts=['a <{trigger}> castle']"]

    def kohya(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.sd1 / "lora" / "ink.safetensors"))


def _layers(tensors: dict) -> int:
    return len({key.split(".", 1)[0] for key in tensors})


def _raw_safetensors(header: dict, data: bytes = b"", claimed: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def _payload_pickle(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with path.open("wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)


# --- asset cases: each returns (args, message) ------------------------------------------------------------------


def zero_byte(c: Case):
    (c.loras / "bad.safetensors").write_bytes(b"")
    return c.lora_args(), (
        f"{c.loras}/bad.safetensors: not a readable safetensors file (file is shorter than a safetensors header); "
        "re-download it"
    )


def truncated(c: Case):
    good = (c.sd1 / "lora" / "ink.safetensors").read_bytes()
    (c.loras / "bad.safetensors").write_bytes(good[: len(good) // 2])
    return c.lora_args(), f"{c.loras}/bad.safetensors: not a readable safetensors file (tensor data extends past"


def garbage(c: Case):
    (c.loras / "bad.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 8)
    return c.lora_args(), f"{c.loras}/bad.safetensors: not a readable safetensors file (header claims"


def header_longer_than_file(c: Case):
    (c.loras / "bad.safetensors").write_bytes(_raw_safetensors({}, claimed=4096))
    return c.lora_args(), f"{c.loras}/bad.safetensors: not a readable safetensors file (header is truncated)"


def huge_header(c: Case):
    (c.loras / "bad.safetensors").write_bytes(_raw_safetensors({}, claimed=1 << 40))
    return c.lora_args(), (
        f"{c.loras}/bad.safetensors: not a readable safetensors file (header claims 1099511627776 bytes)"
    )


def header_not_json(c: Case):
    (c.loras / "bad.safetensors").write_bytes(struct.pack("<Q", 9) + b"{not json")
    return c.lora_args(), f"{c.loras}/bad.safetensors: not a readable safetensors file ("


def empty_lora(c: Case):
    (c.loras / "bad.safetensors").write_bytes(_raw_safetensors({}))
    return c.lora_args(), f"{c.loras}/bad.safetensors: holds no LoRA tensors (an empty file?); re-save it or remove it"


def int_dtype_lora(c: Case):
    tensors = c.kohya()
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(c.loras / "bad.safetensors"))
    return c.lora_args(), f"{c.loras}/bad.safetensors: tensor {key} is I32; LoRA weights must be floating point"


def bool_dtype_ti(c: Case):
    save_file({"emb_params": torch.ones(2, 768, dtype=torch.bool)}, str(c.tis / "bad.safetensors"))
    return c.ti_args(), f"{c.tis}/bad.safetensors: tensor emb_params is BOOL; embedding vectors must be floating point"


def nan_lora(c: Case):
    tensors = c.kohya()
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(c.loras / "bad.safetensors"))
    return c.lora_args(), f"{c.loras}/bad.safetensors: tensor {key} holds NaN or Inf values; re-download"


def inf_ti(c: Case):
    vectors = torch.zeros(2, 768)
    vectors[1, 3] = float("inf")
    save_file({"emb_params": vectors}, str(c.tis / "bad.safetensors"))
    return c.ti_args(), f"{c.tis}/bad.safetensors: tensor emb_params holds NaN or Inf values; re-download or re-train"


def nan_pickled_ti(c: Case):
    torch.save({"string_to_param": {"*": torch.full((1, 768), float("nan"))}}, c.tis / "bad.pt")
    return c.ti_args(), f"{c.tis}/bad.pt: tensor string_to_param.* holds NaN or Inf values"


def unknown_keys(c: Case):
    tensors = c.kohya()
    tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(c.loras / "bad.safetensors"))
    return c.lora_args(), (
        f"{c.loras}/bad.safetensors: 1 of {_layers(tensors)} layers map to no module of this sd-1 model, e.g. "
        "lora_unet_no_such_block; is it for another model?"
    )


def lora_of_another_base(c: Case):
    shutil.copy(c.sdxl / "lora" / "ink.safetensors", c.loras / "bad.safetensors")
    return c.lora_args(), (
        "sweep.stacks.s: LoRA 'bad' is sdxl, and no model of this sweep is (tiny_sd1 is sd-1); "
        "remove it from the stack or render an sdxl model"
    )


def ti_of_another_base(c: Case):
    save_file({"emb_params": torch.zeros(2, 1024)}, str(c.tis / "bad.safetensors"))
    return c.ti_args(), (
        "sweep.prompts[0]: embedding <bad> is sd-2, and no model of this sweep is (tiny_sd1 is sd-1); "
        "remove it from the prompt or render an sd-2 model"
    )


def shapes_do_not_match(c: Case):
    tensors = c.kohya()
    key = next(k for k in tensors if k.endswith("lora_down.weight") and "lora_unet" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(c.loras / "bad.safetensors"))
    layer = key.split(".", 1)[0]
    return c.lora_args(), (
        f"{c.loras}/bad.safetensors: 1 of {_layers(tensors)} layers map to no module of this sd-1 model, e.g. {layer};"
    )


def directory_named_like_a_file(c: Case):
    (c.loras / "bad.safetensors").mkdir()
    return c.lora_args(), f"{c.loras}/bad.safetensors: is a directory, not a LoRA file; move or rename it"


def unreadable(c: Case):
    path = c.loras / "bad.safetensors"
    shutil.copy(c.sd1 / "lora" / "ink.safetensors", path)
    path.chmod(0)
    c.unreadable = path  # root reads anything: the test also refuses the open itself
    return c.lora_args(), f"{path}: cannot read it (Permission denied); fix its permissions"


def symlink_loop(c: Case):
    (c.loras / "bad.safetensors").symlink_to(c.loras / "other.safetensors")
    (c.loras / "other.safetensors").symlink_to(c.loras / "bad.safetensors")
    return c.lora_args(), f"{c.loras}/bad.safetensors: a broken symlink or a symlink loop; fix the link or remove it"


def dangling_symlink(c: Case):
    (c.tis / "bad.pt").symlink_to(c.tmp / "gone.pt")
    return c.ti_args(), f"{c.tis}/bad.pt: a broken symlink or a symlink loop; fix the link or remove it"


def lora_name_is_a_relative_path(c: Case):
    shutil.copy(c.sd1 / "lora" / "ink.safetensors", c.loras / "ink.safetensors")
    return c.lora_args("../loras/ink"), (
        "sweep.stacks.s: LoRA name '../loras/ink' is a path; name LoRAs by file stem (such as 'ink') and list "
        "their folders in models.NAME.loras"
    )


def lora_name_is_an_absolute_path(c: Case):
    return c.lora_args("/etc/passwd"), "sweep.stacks.s: LoRA name '/etc/passwd' is a path; name LoRAs by file stem"


def checkpoint_escapes_the_root(c: Case):
    root = c.tmp / "root"
    (root / "main").mkdir(parents=True)
    return [f"models.tiny_sd1.root={root}", "models.tiny_sd1.checkpoint=../../outside"], (
        f"models.tiny_sd1.checkpoint: ../../outside escapes the model root {root}; name a checkpoint under "
        f"{root}/main, or give an absolute path"
    )


def non_utf8_name(c: Case):
    shutil.copy(c.sd1 / "lora" / "ink.safetensors", c.loras / "bad.safetensors")
    with open(os.fsencode(c.loras) + b"/caf\xe9.safetensors", "wb") as f:
        f.write(b"")
    return c.lora_args(), f"{c.loras}/caf\\xe9.safetensors: the file name is not valid UTF-8; rename it"


def pickle_payload(suffix: str, kind: str) -> Callable[[Case], tuple]:
    def case(c: Case):
        folder = c.tis if kind == "embedding" else c.loras
        c.marker = c.tmp / "pwned"
        _payload_pickle(folder / f"bad{suffix}", c.marker)
        args = c.ti_args() if kind == "embedding" else c.lora_args()
        return args, f"{folder}/bad{suffix}: refused, the pickle would run code or load non-tensor objects"

    case.__name__ = f"pickle_payload_{kind}{suffix.replace('.', '_')}"
    return case


def pickled_checkpoint_payload(zip_format: bool) -> Callable[[Case], tuple]:
    """A .ckpt whose pickle calls os.system: in torch's zip format beside real tensors, or a bare pickle."""

    def case(c: Case):
        c.marker = c.tmp / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {c.marker}",))

        path = c.tmp / "model.ckpt"
        if zip_format:
            torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 4), "x": Payload()}}, path)
        else:
            path.write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}, protocol=2))
        system = f"{os.system.__module__}.{os.system.__name__}"
        return [f"models.tiny_sd1.checkpoint={path}", "models.tiny_sd1.builtin=null"], (
            f"{path}: refused, the pickle would run code or load non-tensor objects (it references {system}); "
            "use a .safetensors version of this file\n"
        )

    case.__name__ = f"pickled_checkpoint_payload_{'zip' if zip_format else 'plain'}"
    return case


def checkpoint_of_unknown_type(c: Case):
    (c.tmp / "model.bin").write_bytes(b"weights")
    return [f"models.tiny_sd1.checkpoint={c.tmp}/model.bin", "models.tiny_sd1.builtin=null"], (
        f"models.tiny_sd1.checkpoint: {c.tmp}/model.bin is not a checkpoint file batchgen reads; give a diffusers "
        "folder or a single file ending in .safetensors, .ckpt, .pt, .pth\n"
    )


# --- config cases ----------------------------------------------------------------------------------------------


def invalid_yaml(c: Case):
    (c.tmp / "conf" / "sweep" / "broken.yaml").write_text("sweep:\n  name: broken\n  prompts: [unclosed\n")
    return ["+sweep=broken"], f"{c.tmp}/conf/sweep/broken.yaml: not valid YAML"


def unknown_key(c: Case):
    # not Hydra's advice to append: the schema has no such key
    return ["sweep.colour=red"], "override 'sweep.colour=red': sweep has no key 'colour'; its keys are name, models,"


def unknown_key_near_a_real_one(c: Case):
    return ["sweep.seed=3"], "override 'sweep.seed=3': sweep has no key 'seed'; did you mean 'seeds'?"


def appended_key_the_schema_lacks(c: Case):
    return ["+sweep.seed=3"], "override '+sweep.seed=3': sweep has no key 'seed'; did you mean 'seeds'?"


def appended_run_key_the_schema_lacks(c: Case):
    return ["+run.thread=1"], "override '+run.thread=1': run has no key 'thread'; did you mean 'threads'?"


def unknown_model_key(c: Case):
    return ["models.tiny_sd1.lora=[x]"], (
        "override 'models.tiny_sd1.lora=[x]': models.tiny_sd1 has no key 'lora'; did you mean 'loras'?"
    )


def unknown_key_on_an_axis(c: Case):
    return ["sweep.seed=1,2"], "override 'sweep.seed=1,2': sweep has no key 'seed'; did you mean 'seeds'?"


def wrong_type(c: Case):
    return ["run.compile=maybe"], (
        "override 'run.compile=maybe': Value 'maybe' is not a valid bool (type str); give run.compile a value of its "
        "type\n"
    )


def unknown_dtype(c: Case):
    return ["run.dtype=fp8"], "run.dtype: 'fp8' is not a dtype; use auto, fp16, bf16 or fp32\n"


def compile_not_a_bool(c: Case):
    return ["run.compile=null"], (
        "override 'run.compile=null': field 'run.compile' is not Optional; give run.compile a value of its type\n"
    )


def zero_threads(c: Case):
    return ["run.threads=0"], "run.threads=0: give a thread count of at least 1, or null for automatic\n"


def zero_batch_size(c: Case):
    return ["sweep.batch_size=0"], "sweep.batch_size: '0' is neither 'auto' nor a positive integer\n"


def unknown_offload(c: Case):
    return ["run.offload=cpu"], (
        "run.offload: 'cpu' is not an offload plan; use auto, none, encoders, model or sequential\n"
    )


def zero_gpu_memory(c: Case):
    return ["run.gpu_memory_gb=0"], (
        "run.gpu_memory_gb=0.0: give the device memory in GB (such as 24), or null for the device's own\n"
    )


def unknown_weights(c: Case):
    return ["run.weights=fp4"], "run.weights: 'fp4' is not a weight format; use auto or fp8\n"


def offload_that_cannot_fit(c: Case):
    return ["run.offload=none", "run.gpu_memory_gb=0.01"], (
        "model tiny_sd1: run.offload=none needs 31.1 MB, more than the 10.2 MB planned for (run.gpu_memory_gb); "
        "run.offload=sequential fits\n"
    )


def zero_devices(c: Case):
    return ["executor.devices=0"], "executor.devices=0: need at least 1 worker\n"


def negative_device(c: Case):
    return ["executor.devices=[-1]"], "executor.devices=[-1]: list CUDA device numbers, such as [0,2]\n"


def negative_steps(c: Case):
    return ["sweep.steps=-3"], "sweep.steps: '-3' is not an integer >= 1"


def zero_steps(c: Case):
    return ["sweep.steps=0"], "sweep.steps: '0' is not an integer >= 1"


def width_not_multiple_of_8(c: Case):
    return ["sweep.width=100"], "sweep.width: 100 is not a multiple of 8; use 96 or 104"


def height_not_multiple_of_8(c: Case):
    return ["sweep.height=[64,70]"], "sweep.height: 70 is not a multiple of 8; use 64 or 72"


def guidance_not_a_number(c: Case):
    return ["sweep.guidance_scale=strong"], "sweep.guidance_scale: 'strong' is not a number"


def empty_prompts(c: Case):
    return ["sweep.prompts=[]"], "sweep.prompts is empty; give at least one prompt"


def weight_out_of_range(c: Case):
    shutil.copy(c.sd1 / "lora" / "ink.safetensors", c.loras / "ink.safetensors")
    return [f"models.tiny_sd1.loras=[{c.loras}]", "+sweep.stacks.s={ink: 12}"], (
        "sweep.stacks.s.ink: weight 12 is outside [-10, 10]; LoRA weights are usually between -2 and 2"
    )


def too_many_jobs(c: Case):
    return ["sweep.seeds=range(0,50)", "run.max_jobs=20"], (
        "the sweep has 50 jobs to render, more than run.max_jobs=20; pass --yes to render them all, "
        "or raise run.max_jobs"
    )


def bad_override_syntax(c: Case):
    return ["sweep.steps=[1"], "bad override 'sweep.steps=[1':"


def plus_on_existing_key(c: Case):
    return ["+sweep.steps=3"], (
        "override '+sweep.steps=3': sweep.steps already exists; drop the '+' to change it (sweep.steps=3)"
    )


def tilde_on_missing_key(c: Case):
    return ["~sweep.stacks.nothing"], "override '~sweep.stacks.nothing': there is no sweep.stacks.nothing to remove"


def checkpoint_not_a_pipeline(c: Case):
    (c.tmp / "notapipe").mkdir()
    (c.tmp / "notapipe" / "readme.txt").write_text("hi")
    return [f"models.tiny_sd1.checkpoint={c.tmp}/notapipe", "models.tiny_sd1.builtin=null"], (
        f"models.tiny_sd1.checkpoint: {c.tmp}/notapipe is a folder without model_index.json, not a diffusers pipeline"
    )


def _single_file(c: Case, name: str, key: str, message: str):
    """A single file holding one tensor `key`, given as tiny_sd1's checkpoint; the expected error after the path."""
    save_file({key: torch.zeros(2, 2)}, str(c.tmp / name))
    return [f"models.tiny_sd1.checkpoint={c.tmp}/{name}", "models.tiny_sd1.builtin=null"], (
        f"models.tiny_sd1.checkpoint: {c.tmp}/{name} {message}"
    )


def single_file_without_config(c: Case):
    return _single_file(
        c, "model.safetensors", "some.weight", "is not a Stable Diffusion checkpoint this batchgen can read (no UNet "
        "keys of SD1, SD2 or SDXL); give a diffusers folder"
    )  # fmt: skip


def flux_single_file(c: Case):
    # a ComfyUI-layout FLUX.1 file keeps its transformer under model.diffusion_model. as SD files keep the UNet;
    # read as FLUX.1 (tests/test_flux_single_file.py), it is no model for an SD1 config
    path = c.tmp / "flux1-dev.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    return [f"models.tiny_sd1.checkpoint={path}", "models.tiny_sd1.builtin=null"], (
        f"models.tiny_sd1.base: 'sd-1' but {path} is a FLUX.1 checkpoint; fix base"
    )


def sd3_single_file(c: Case):
    # an SGM-layout SD3 file, read as SD3/SD3.5 (tests/test_sd3_single_file.py), is no model for an SD1 config
    path = c.tmp / "sd3.5_large.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    return [f"models.tiny_sd1.checkpoint={path}", "models.tiny_sd1.builtin=null"], (
        f"models.tiny_sd1.base: 'sd-1' but {path} is a SD3/SD3.5 checkpoint; fix base"
    )


# --- sweep.metrics: folders checked at planning -------------------------------------------------------------------

_FIX_CLIP = "give a local transformers CLIPModel folder (hf download openai/clip-vit-large-patch14 --local-dir DIR)"


def _model_folder(c: Case, name: str, model_type: str, *files: str) -> Path:
    folder = c.tmp / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for file in files:
        (folder / file).write_text("{}")
    return folder


def metrics_clip_missing(c: Case):
    return [f"sweep.metrics.clip={c.tmp}/nothing"], (
        f"sweep.metrics.clip: {c.tmp}/nothing is not a folder; {_FIX_CLIP}\n"
    )


def metrics_clip_without_weights(c: Case):
    folder = _model_folder(c, "clip", "clip", "preprocessor_config.json", "tokenizer.json")
    return [f"sweep.metrics.clip={folder}"], (
        f"sweep.metrics.clip: {folder} has no weights (model.safetensors or pytorch_model.bin); {_FIX_CLIP}\n"
    )


def metrics_clip_without_processor(c: Case):
    folder = _model_folder(c, "clip", "clip", "model.safetensors", "tokenizer.json")
    return [f"sweep.metrics.clip={folder}"], (
        f"sweep.metrics.clip: {folder} has no preprocessor_config.json (its image processor); copy it from the "
        "model's repository into the folder\n"
    )


def metrics_dino_is_a_clip(c: Case):
    folder = _model_folder(c, "clip", "clip", "model.safetensors", "preprocessor_config.json")
    return [f"sweep.metrics.dino={folder}"], (
        f"sweep.metrics.dino: {folder} holds a clip model (config.json), not DINO (dinov2, dinov2_with_registers, "
        "vit, dinov3_vit); give a local transformers DINO or DINOv2 folder (hf download facebook/dinov2-small "
        "--local-dir DIR)\n"
    )


def metrics_concept_of_no_lora(c: Case):
    (c.tmp / "inq").mkdir()
    (c.tmp / "inq" / "1.png").write_bytes(_PNG)
    return [f"+sweep.metrics.concepts.inq={c.tmp}/inq"], (
        "sweep.metrics.concepts.inq: no LoRA or TI of the sweep's models is named 'inq' (did you mean 'ink'?); name "
        "a LoRA (its file stem) or a TI trigger; found: alf, cartoona, grain, grainy, hatch, ink, kron, pastel, "
        "peft_sketch\n"
    )


def metrics_concept_without_images(c: Case):
    (c.tmp / "ink_train").mkdir()
    (c.tmp / "ink_train" / "notes.txt").write_text("captions only")
    return [f"+sweep.metrics.concepts.ink={c.tmp}/ink_train"], (
        f"sweep.metrics.concepts.ink: {c.tmp}/ink_train holds no images (.png, .jpg, .jpeg, .webp, .bmp); put ink's "
        "training images there\n"
    )


def metrics_unknown_builtin(c: Case):
    return ["sweep.metrics.builtin=tiny"], (
        "sweep.metrics.builtin: 'tiny' is no builtin set; use tiny_metrics, or null with your own folders\n"
    )


_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


CASES = [
    zero_byte,
    truncated,
    garbage,
    header_longer_than_file,
    huge_header,
    header_not_json,
    empty_lora,
    int_dtype_lora,
    bool_dtype_ti,
    nan_lora,
    inf_ti,
    nan_pickled_ti,
    unknown_keys,
    lora_of_another_base,
    ti_of_another_base,
    shapes_do_not_match,
    directory_named_like_a_file,
    unreadable,
    symlink_loop,
    dangling_symlink,
    lora_name_is_a_relative_path,
    lora_name_is_an_absolute_path,
    checkpoint_escapes_the_root,
    non_utf8_name,
    *(pickle_payload(s, k) for s in (".pt", ".bin", ".ckpt") for k in ("embedding", "lora")),
    pickled_checkpoint_payload(zip_format=True),
    pickled_checkpoint_payload(zip_format=False),
    checkpoint_of_unknown_type,
    invalid_yaml,
    unknown_key,
    unknown_key_near_a_real_one,
    appended_key_the_schema_lacks,
    appended_run_key_the_schema_lacks,
    unknown_model_key,
    unknown_key_on_an_axis,
    wrong_type,
    unknown_dtype,
    compile_not_a_bool,
    zero_threads,
    zero_batch_size,
    unknown_offload,
    zero_gpu_memory,
    unknown_weights,
    offload_that_cannot_fit,
    zero_devices,
    negative_device,
    negative_steps,
    zero_steps,
    width_not_multiple_of_8,
    height_not_multiple_of_8,
    guidance_not_a_number,
    empty_prompts,
    weight_out_of_range,
    too_many_jobs,
    bad_override_syntax,
    plus_on_existing_key,
    tilde_on_missing_key,
    checkpoint_not_a_pipeline,
    single_file_without_config,
    flux_single_file,
    sd3_single_file,
    metrics_clip_missing,
    metrics_clip_without_weights,
    metrics_clip_without_processor,
    metrics_dino_is_a_clip,
    metrics_concept_of_no_lora,
    metrics_concept_without_images,
    metrics_unknown_builtin,
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous_run(tmp_path: Path) -> Path:
    """A run directory from an earlier invocation, which no bad input may touch."""
    run = tmp_path / "runs" / "bad"
    (run / "images").mkdir(parents=True)
    (run / ".batchgen" / "20260101-000000").mkdir(parents=True)
    (run / "manifest.csv").write_text("job_id,status\n0123456789abcdef,ok\n")
    (run / "images" / "0123456789abcdef.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (run / "index.html").write_text("<html></html>")
    (run / ".batchgen" / "20260101-000000" / "overrides.yaml").write_text("[]\n")
    return run


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_with_one_line_before_any_model_loads(
    case, run_cli, tiny_cache: Path, tmp_path: Path, previous_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    from batchgen.engine import worker

    loads: list[str] = []

    def spy(*args, **kwargs):
        loads.append("loaded")
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(worker, "load_pipeline", spy)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", spy)
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "bad.yaml").write_text(SWEEP)
    c = Case(tmp_path, tiny_cache)
    args, message = case(c)
    if hasattr(c, "unreadable"):
        real_open = Path.open

        def refuse(self, *a, **k):
            if self == c.unreadable:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *a, **k)

        monkeypatch.setattr(Path, "open", refuse)
    before = _snapshot(previous_run)
    sweep = [] if any(a.startswith("+sweep=") for a in args) else ["+sweep=bad"]
    code, out, err = run_cli("--config-dir", str(tmp_path / "conf"), *sweep, *args)
    assert (code, loads) == (2, []), err
    assert err.startswith(f"batchgen: error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert _snapshot(previous_run) == before
    if hasattr(c, "marker"):
        assert not c.marker.exists(), "the pickle's payload ran"
