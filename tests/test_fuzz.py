"""Property tests on outcomes, not just "no traceback". A random LoRA or TI file is either refused with one line
naming the file and the reason, or accepted, and then everything it yields is finite, floating point and shaped
for its module (a LoRA with NaN, inf or integer tensors is never accepted). A random override either composes and
plans, with stable job_ids and a job count that scales with the one axis it changed, or fails with one line
naming it. Seeded in `make test`; `make fuzz` runs many more examples (HYPOTHESIS_PROFILE=fuzz)."""

from __future__ import annotations

import functools
import json
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from batchgen.assets.architecture import model_architecture
from batchgen.assets.embeddings import inspect_embedding
from batchgen.assets.hashing import HashCache
from batchgen.assets.loras import inspect_lora
from batchgen.config import compose_config
from batchgen.errors import BatchgenError
from batchgen.runner import prepare
from batchgen.spec import EmbeddingFile, LoraFile
from batchgen.tiny import tiny_root

# tiny SD1 modules a kohya LoRA can name (a sound file naming them must be accepted), and two that it cannot
UNET_MODULE = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
TE_MODULE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV_MODULE = "lora_unet_down_blocks_0_resnets_0_conv1"
MODULES = [UNET_MODULE, TE_MODULE, CONV_MODULE, "lora_unet_no_such_module", "not_a_prefix_at_all"]
SUFFIXES = [
    "lora_down.weight",
    "lora_up.weight",
    "alpha",
    "lora_mid.weight",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "dora_scale",
    "diff",
    "diff_b",
    "weight",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.bool]
DIMS = st.sampled_from([1, 2, 3, 4, 8, 32, 64, 320, 768])
SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "X99", 7]


@pytest.fixture(scope="module")
def sd1(tiny_cache: Path):
    from diffusers import StableDiffusionPipeline

    checkpoint = tiny_root("tiny_sd1", tiny_cache) / "main" / "tiny_sd1"
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), local_files_only=True, safety_checker=None)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    return model_architecture(checkpoint, "sd-1"), components, dict(pipe.unet.config)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, special: str) -> torch.Tensor:
    t = torch.randn(shape) if shape else torch.tensor(4.0)
    if special == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    if special == "inf" and t.numel():
        t.view(-1)[-1] = float("inf")
    return t.to(dtype)


lora_tensors = st.dictionaries(
    st.tuples(st.sampled_from(MODULES), st.sampled_from(SUFFIXES)).map(lambda ms: f"{ms[0]}.{ms[1]}"),
    st.tuples(
        st.lists(DIMS, min_size=0, max_size=4).map(tuple).filter(lambda shape: math.prod(shape) <= 300_000),
        st.sampled_from(DTYPES),
        st.sampled_from(["", "", "", "nan", "inf"]),
    ),
    min_size=1,
    max_size=6,
)

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(spec=lora_tensors)
def test_random_lora_tensors_are_accepted_and_load_or_are_refused(sd1, spec: dict) -> None:
    arch = sd1[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        save_file({key: _tensor(*value) for key, value in spec.items()}, str(path))
        nonfinite = any(special and dtype.is_floating_point for _, dtype, special in spec.values())
        integer = any(not dtype.is_floating_point for _, dtype, _ in spec.values())
        try:
            inspect_lora(LoraFile("fuzz", path), arch, HashCache(None))
        except BatchgenError as e:
            message = str(e)
            # one line: the file, then the key or the reason
            assert message.startswith(f"{path}: ") and len(message) > len(f"{path}: ") + 8 and "\n" not in message
            return
        assert not nonfinite and not integer, f"accepted a file with NaN/inf or integer tensors: {spec}"
        _assert_lora_loads(path, sd1)


def _assert_lora_loads(path: Path, sd1) -> None:
    """What an accepted LoRA must give the engine: layers whose deltas are finite fp32, shaped as their modules."""
    from batchgen.engine.patcher import load_lora_layers

    _, components, unet_config = sd1
    layers = load_lora_layers(path, components, unet_config, "cpu")  # accepted files must load
    assert layers, "accepted a LoRA that changes no module: its images would be labelled with it and equal none"
    for ref, layer in layers.items():
        weight = components[ref.component].get_submodule(ref.path).weight
        delta = layer.delta(weight.detach().float())
        assert delta.dtype == weight.dtype == torch.float32 and delta.shape == weight.shape, ref
        assert torch.isfinite(delta).all(), ref


def _assert_embedding_reads(path: Path, ti: EmbeddingFile) -> None:
    """What an accepted TI must give the engine: at least the vectors it counts, finite, of its base's widths."""
    from batchgen.assets.tensors import embedding_vectors, read_state_dict

    vectors = embedding_vectors(read_state_dict(path), path)  # what the engine registers
    assert sum(v.shape[0] for v in vectors.values()) >= ti.vectors
    widths = {"sd-1": {768}, "sd-2": {1024}, "sdxl": {768, 1280}}[ti.base]
    for vector in vectors.values():
        # (a tensor the reader does not take, beside the vectors, may hold anything)
        assert vector.dtype.is_floating_point and torch.isfinite(vector).all()
        assert vector.ndim == 2 and vector.shape[0] >= 1 and vector.shape[1] in widths


header_values = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(SAFETENSORS_DTYPES),
        "shape": st.lists(st.integers(-2, 1 << 40), max_size=4),
        "data_offsets": st.lists(st.integers(-5, 1 << 41), min_size=0, max_size=3),
    }
)
raw_headers = st.one_of(
    st.binary(max_size=256),
    st.tuples(
        st.dictionaries(
            st.sampled_from([f"{UNET_MODULE}.lora_down.weight", "emb_params", "clip_l", "x"]),
            st.one_of(header_values, st.integers(), st.text(max_size=5)),
            max_size=4,
        ),
        st.binary(max_size=64),
        st.one_of(st.none(), st.integers(0, 1 << 62)),
    ).map(lambda t: _raw(*t)),
)


def _raw(header: dict, data: bytes, claimed: int | None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text + data


@dataclass(frozen=True)
class Damage:
    """A sound file with one thing done to its bytes: `at` is a fraction of its length."""

    file: str  # "lora" or "embedding"
    how: str  # "none", "byte" (set the byte at `at` to `value`), "cut" (truncate at `at`), "append" (`value` more)
    at: float = 0.0
    value: int = 0


# A kohya LoRA of the three tiny SD1 modules above, shaped for them, and an emb_params TI of two SD1 vectors.
SOUND = {
    "lora": {
        f"{UNET_MODULE}.lora_down.weight": torch.full((4, 64), 0.25),
        f"{UNET_MODULE}.lora_up.weight": torch.full((64, 4), -0.5),
        f"{UNET_MODULE}.alpha": torch.tensor(2.0),
        f"{TE_MODULE}.lora_down.weight": torch.full((4, 768), 0.125),
        f"{TE_MODULE}.lora_up.weight": torch.full((768, 4), 0.5),
        f"{CONV_MODULE}.lora_down.weight": torch.full((4, 32, 3, 3), 0.25),
        f"{CONV_MODULE}.lora_up.weight": torch.full((32, 4, 1, 1), 0.5),
    },
    "embedding": {"emb_params": torch.linspace(-1, 1, 2 * 768).reshape(2, 768)},
}


def _damaged(damage: Damage) -> bytes:
    data = bytearray(save(SOUND[damage.file]))
    at = min(len(data) - 1, int(damage.at * len(data)))
    if damage.how == "byte":
        data[at] = damage.value
    elif damage.how == "cut":
        del data[at:]
    elif damage.how == "append":
        data += bytes(damage.value % 17)
    return bytes(data)


damaged_files = st.builds(
    Damage,
    st.sampled_from(["lora", "embedding"]),
    st.sampled_from(["none", "byte", "byte", "byte", "cut", "append"]),
    st.floats(0, 1),
    st.integers(0, 255),
)
LAST_FLOAT = 1 - 1 / (2 * 768 * 4)  # the high byte of the last vector value: 0x7f/0xff make it NaN or inf


@FUZZ
@given(raw=st.one_of(raw_headers, damaged_files), kind=st.sampled_from(["lora", "embedding"]))
@example(raw=Damage("lora", "none"), kind="lora")
@example(raw=Damage("embedding", "none"), kind="embedding")
@example(raw=Damage("embedding", "byte", LAST_FLOAT, 0x7F), kind="embedding")
@example(raw=_raw({}, b"", None), kind="lora")  # a file of no tensors
def test_random_safetensors_bytes_are_refused_cleanly_or_read_soundly(sd1, raw: bytes | Damage, kind: str) -> None:
    arch = sd1[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        path.write_bytes(_damaged(raw) if isinstance(raw, Damage) else raw)
        try:
            if kind == "lora":
                lora, refs = inspect_lora(LoraFile("fuzz", path), arch, HashCache(None))
            else:
                ti = inspect_embedding(EmbeddingFile("fuzz", path), HashCache(None))
        except BatchgenError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            assert raw != Damage(kind, "none"), f"a sound file was refused: {e}"
            return
        if raw == Damage("lora", "none"):
            assert lora.base == "sd-1" and refs is not None and len(refs) == 3, (lora, refs)
        # Accepted: the bytes are a file safetensors itself reads, and they give the engine what it needs.
        tensors = load_file(str(path))
        if kind == "lora":
            weights = [t for key, t in tensors.items() if not key.endswith("alpha")]  # alphas may be any number
            assert all(t.is_floating_point() and torch.isfinite(t).all() for t in weights), sorted(tensors)
            if refs is None:  # a LoRA for another base is listed, not loaded
                assert lora.base not in (None, "sd-1"), lora
            else:
                _assert_lora_loads(path, sd1)
        else:
            assert ti.vectors >= 1, ti
            _assert_embedding_reads(path, ti)


ti_tensors = st.dictionaries(
    st.sampled_from(["emb_params", "clip_l", "clip_g", "<tok>", "string_to_param", "other"]),
    st.tuples(
        st.lists(st.sampled_from([0, 1, 2, 768, 1024, 1280, 5]), min_size=0, max_size=3)
        .map(tuple)
        .filter(lambda shape: math.prod(shape) <= 300_000),
        st.sampled_from(DTYPES),
        st.sampled_from(["", "", "nan"]),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(spec=ti_tensors)
def test_random_embeddings_are_read_or_refused(tiny_cache: Path, spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        save_file({key: _tensor(*value) for key, value in spec.items()}, str(path))
        try:
            ti = inspect_embedding(EmbeddingFile("fuzz", path), HashCache(None))
        except BatchgenError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            return
        _assert_embedding_reads(path, ti)


override_keys = st.sampled_from(
    [
        "sweep.steps",
        "sweep.seeds",
        "sweep.stacks.ink.ink",
        "sweep.width",
        "run.out_dir",
        "sweep.grid.x",
        "sweep",
        "models.tiny_sd1.base",
        "sweep.prompts",
        "executor.devices",
        "nothing.here",
        "",
        "sweep.stacks",
    ]
)
override_values = st.one_of(
    st.sampled_from(["1", "1,2", "range(0,3)", "[1,2", "{a: 1}", "null", "'x'", "choice(1,2)", "-1", "${oops}", ""]),
    st.text(alphabet="abc019.,=[]{}()'\"+~:$ -_/\\", max_size=12),
)


@FUZZ
@given(
    prefix=st.sampled_from(["", "+", "~", "++"]),
    key=override_keys,
    op=st.sampled_from(["=", "", "=="]),
    value=override_values,
)
def test_random_overrides_compose_or_fail_cleanly(
    tiny_cache: Path, prefix: str, key: str, op: str, value: str
) -> None:
    override = f"{prefix}{key}{op}{value}"
    try:
        composed = compose_config(["+sweep=styles", override])
        first, second = prepare(composed), prepare(composed)
    except BatchgenError as e:
        message = str(e)
        assert "\n" not in message
        # named: the override or its key (a bare "=value" has no key to name)
        assert override in message or key.split(".")[-1] in message or not key, message
        return
    assert list(first.table["job_id"]) == list(second.table["job_id"])  # job_ids stable from plan to plan
    base = _base_plan()
    counts, base_counts = first.axis_counts(), base.axis_counts()
    axis = {"sweep.steps": "steps", "sweep.seeds": "seed", "sweep.width": "width"}.get(key)
    if axis is not None:  # one axis changed: the job count scales by its length alone
        assert len(first.table) * base_counts[axis] == len(base.table) * counts[axis], override


@functools.cache
def _base_plan():
    return prepare(compose_config(["+sweep=styles"]))
