"""The PNG `parameters` chunk read back the way AUTOMATIC1111 reads it, and the hashes it writes.

The parser below follows modules/infotext_utils.py (parse_generation_parameters, re_param_code, unquote) of
stable-diffusion-webui, so what passes here is what A1111 and the tools copying it show.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from pathlib import Path

from batchgen.engine.png import a1111_lora_hash, a1111_parameters
from batchgen.spec import EmbeddingFile, LoraFile, ModelSpec

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(infotext: str) -> dict[str, str]:
    """parse_generation_parameters without A1111's defaults for absent keys."""
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = infotext.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)  # A1111's unquote
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def safetensors_file(path: Path, metadata: dict[str, str] | None = None, values: tuple = (0.5, -1.0)) -> Path:
    """A valid safetensors file with one small tensor (no torch needed)."""
    header: dict = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", *values))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_with(tmp_path: Path, name: str = "tiny_sd1") -> ModelSpec:
    ink = safetensors_file(tmp_path / "ink.safetensors")
    grain = safetensors_file(tmp_path / "grain.safetensors", {"sshs_model_hash": "ab" * 32, "ss_output_name": "g"})
    old = tmp_path / "old.pt"
    old.write_bytes(b"a pickle stands in here")
    ti = tmp_path / "alf.pt"
    ti.write_bytes(b"an embedding")
    return ModelSpec(
        name=name,
        base="sd-1",
        checkpoint=tmp_path / "ckpt.safetensors",
        checkpoint_sha256="0123456789abcdef" * 4,
        embeddings=(EmbeddingFile("alf", ti, sha256(ti.read_bytes())),),
        loras=(
            LoraFile("ink", ink, sha256(ink.read_bytes())),
            LoraFile("grain", grain, sha256(grain.read_bytes())),
            LoraFile("old", old, sha256(old.read_bytes())),
        ),
    )


def row(**change: object) -> dict[str, object]:
    base = {
        "prompt": "a portrait of <alf>, detailed",
        "negative_prompt": "blurry, lowres",
        "loras": "grain:0.6;ink:0.5/0.25",
        "embeddings": "alf",
        "steps": 20,
        "scheduler": "dpmpp_2m_karras",
        "guidance_scale": 7.5,
        "seed": 1234,
        "width": 64,
        "height": 48,
    }
    return {**base, **change}


def test_parameters_read_back_with_a1111s_parser(tmp_path):
    spec = spec_with(tmp_path)
    text = a1111_parameters(row(), spec)
    ink_data = (tmp_path / "ink.safetensors").read_bytes()
    header_len = struct.unpack("<Q", ink_data[:8])[0]
    ink_hash = sha256(ink_data[8 + header_len :])[:12]
    assert text.split("\n") == [
        "a portrait of <alf>, detailed <lora:grain:0.6> <lora:ink:te=0.25:unet=0.5>",
        "Negative prompt: blurry, lowres",
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 64x48, Model hash: 0123456789, "
        f'Model: tiny_sd1, Lora hashes: "grain: {"ab" * 6}, ink: {ink_hash}", '
        f'TI hashes: "alf: {sha256(b"an embedding")[:12]}", Version: batchgen',
    ]
    parsed = a1111_parse(text)
    assert parsed == {
        "Prompt": "a portrait of <alf>, detailed <lora:grain:0.6> <lora:ink:te=0.25:unet=0.5>",
        "Negative prompt": "blurry, lowres",
        "Steps": "20",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7.5",
        "Seed": "1234",
        "Size-1": "64",
        "Size-2": "48",
        "Model hash": "0123456789",
        "Model": "tiny_sd1",
        "Lora hashes": f"grain: {'ab' * 6}, ink: {ink_hash}",
        "TI hashes": f"alf: {sha256(b'an embedding')[:12]}",
        "Version": "batchgen",
    }


def test_values_with_commas_or_colons_are_quoted_like_a1111(tmp_path):
    spec = spec_with(tmp_path, name="sd15: pruned, v2")
    text = a1111_parameters(row(loras="", embeddings="", negative_prompt=""), spec)
    assert text.split("\n")[-1].endswith(', Model: "sd15: pruned, v2", Version: batchgen')
    assert "Negative prompt" not in text  # A1111 leaves the line out when there is none
    parsed = a1111_parse(text)
    assert parsed["Model"] == "sd15: pruned, v2" and parsed["Seed"] == "1234" and parsed["Negative prompt"] == ""


def test_lora_hash_is_a1111s_choice_per_file_kind(tmp_path):
    spec = spec_with(tmp_path)
    ink, grain, old = spec.loras
    data = ink.path.read_bytes()
    addnet = sha256(data[8 + struct.unpack("<Q", data[:8])[0] :])
    assert a1111_lora_hash(ink) == addnet[:12] and addnet != ink.sha256  # tensor data only, not the header
    assert a1111_lora_hash(grain) == "ab" * 6  # the trainer's sshs_model_hash wins
    assert a1111_lora_hash(old) == old.sha256[:12]  # not safetensors: the whole file
    safetensors_file(ink.path, {"note": "retrained"}, values=(2.0, 3.0))  # a replaced file is hashed again
    data = ink.path.read_bytes()
    assert a1111_lora_hash(ink) == sha256(data[8 + struct.unpack("<Q", data[:8])[0] :])[:12] != addnet[:12]


def test_hash_lists_drop_commas_from_names(tmp_path):
    spec = spec_with(tmp_path)
    odd = LoraFile("a,b", spec.lora("old").path, spec.lora("old").sha256)
    spec = ModelSpec(**{**spec.__dict__, "loras": (*spec.loras, odd)})
    text = a1111_parameters(row(loras="a,b:1", embeddings=""), spec)
    assert a1111_parse(text)["Lora hashes"] == f"ab: {spec.lora('old').sha256[:12]}"


def test_default_scheduler_is_named_after_the_checkpoints_own(tmp_path):
    def sampler(folder: str, config: dict | None) -> str:
        ckpt = tmp_path / folder
        if config is not None:
            (ckpt / "scheduler").mkdir(parents=True)
            (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        spec = ModelSpec(name="m", base="sd-1", checkpoint=ckpt, checkpoint_sha256="0" * 64)
        text = a1111_parameters(row(loras="", embeddings="", scheduler="default"), spec)
        return a1111_parse(text)["Sampler"]

    assert sampler("ddim", {"_class_name": "DDIMScheduler"}) == "DDIM"
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert sampler("karras", karras) == "DPM++ 2M Karras"
    assert sampler("dpm", {"_class_name": "DPMSolverMultistepScheduler"}) == "DPM++ 2M"
    assert sampler("lcm", {"_class_name": "LCMScheduler"}) == "default"  # no A1111 name we know of
    assert sampler("none", None) == "default"


def planned_row(**change: object) -> dict[str, object]:
    """A row as the planner hands it to the writer: every manifest column (NaN where the plan has none), a slot,
    and the stack by its content for the JSON chunk."""
    nan = float("nan")
    base = {
        **dict.fromkeys(("timings", "effect", "ssim", "degenerate", "seconds"), nan),
        **row(loras="grain:0.6;ink:0.5/0.25:lbw=OUTD", seed=7, scheduler="euler_a"),
        **{"job_id": "0123456789abcdef", "status": "", "model": "tiny_sd1", "base": "sd-1", "image": ""},
        **{"image_sha256": "", "worker": "", "finished_at": "", "error": "", "stack": "mine", "epoch": ""},
        **{"prompt_template": "a portrait of <alf>, {style}", "clip_skip": 2, "prompt_syntax": "a1111"},
        **{"pad_prompts": True, "lora_triggers": "ink:ink drawing", "reference": "fedcba9876543210"},
        **{"max_sequence_length": 0, "style": "detailed", "_png_stack": "grain 0.6 + ink 0.5/0.25 lbw=OUTD"},
    }
    return {**base, **change}


def test_png_bytes_are_those_from_before_the_column_table(tmp_path):
    """The parameters text, the JSON chunk and the PNG bytes of a planned row, pinned as the code wrote them before
    the columns moved into batchgen.columns and the cells into batchgen.cells (issue 34): a job's PNG bytes never
    change with a refactor."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from batchgen.engine.writer import encode_row
    from batchgen.spec import RenderResult

    spec = spec_with(tmp_path)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    done, data = encode_row({"tiny_sd1": spec}, planned_row(), RenderResult("0123456789abcdef", image, 1.5, "w0"))
    with Image.open(io.BytesIO(data)) as png:
        text = dict(png.text)
    ink = (tmp_path / "ink.safetensors").read_bytes()
    ink_hash = sha256(ink[8 + struct.unpack("<Q", ink[:8])[0] :])[:12]
    assert text["parameters"].split("\n") == [
        "a portrait of <alf>, detailed <lora:grain:0.6> <lora:ink:te=0.25:unet=0.5:lbw=OUTD>",
        "Negative prompt: blurry, lowres",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x48, Model hash: 0123456789, "
        f'Model: tiny_sd1, Clip skip: 2, Pad conds: True, Lora hashes: "grain: {"ab" * 6}, ink: {ink_hash}", '
        f'TI hashes: "alf: {sha256(b"an embedding")[:12]}", Version: batchgen',
    ]
    assert text["batchgen"] == (
        '{"base": "sd-1", "clip_skip": 2, "embeddings": "alf", "epoch": "", "guidance_scale": 7.5, "height": 48, '
        '"job_id": "0123456789abcdef", "lora_triggers": "ink:ink drawing", '
        '"loras": "grain:0.6;ink:0.5/0.25:lbw=OUTD", "max_sequence_length": 0, "model": "tiny_sd1", '
        '"negative_prompt": "blurry, lowres", "pad_prompts": true, "prompt": "a portrait of <alf>, detailed", '
        '"prompt_syntax": "a1111", "prompt_template": "a portrait of <alf>, {style}", "scheduler": "euler_a", '
        '"seed": 7, "stack": "grain 0.6 + ink 0.5/0.25 lbw=OUTD", "steps": 20, "style": "detailed", "width": 64}'
    )
    # Nothing else goes in: the bytes are those of the image with these two chunks, in this order.
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    again = io.BytesIO()
    image.save(again, format="PNG", pnginfo=info)
    assert list(text) == ["parameters", "batchgen"] and data == again.getvalue()
    assert (done["status"], done["image"], done["image_sha256"], done["worker"]) == (
        "ok",
        "images/0123456789abcdef.png",
        sha256(data),
        "w0",
    )
