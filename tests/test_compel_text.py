"""prompt_syntax=compel's text encoding against compel itself, used as its documentation shows, on the tiny models;
and the planning check of what compel cannot render."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compel import Compel, CompelForSDXL, DiffusersTextualInversionManager, ReturnedEmbeddingsType

from batchgen.assets.bases import BY_NAME
from batchgen.engine.compel_text import _READERS, compel_encode
from batchgen.engine.pipeline import load_pipeline, register_embeddings
from batchgen.engine.prompts import PromptCache
from batchgen.errors import BatchgenError
from batchgen.plan.compel_rules import check_compel
from batchgen.spec import EmbeddingFile, Job, LoraState, ModelSpec
from tests.reference import clip_skip_alias

LONG = " ".join(["a castle at night with towers and a river and the moon over the hills"] * 8)
BLEND = '("a castle at night", "a dog in the snow").blend(0.7, 0.3)'
AND = '("a castle at night", "a dog in the snow").and()'
WEIGHTED_AND = '("a castle at night", "a dog in the snow").and(1, 0.5)'
# The tiny models' two-vector TIs: SD1's <grainy>, SDXL's <cartoona> (batchgen/tiny/embeddings.py).
TI = {"tiny_sd1": "grainy", "tiny_sdxl": "cartoona"}


def _texts(name: str) -> list[str]:
    ti = TI[name]
    return [
        "a castle+ at night",
        "(a castle)1.3 at night",
        "a castle at night, (towers)0.5",
        BLEND,
        AND,
        LONG,
        f"{LONG}, (river)1.4, (moon)0.6",
        f"(a <{ti}> castle)1.3 at night",
        f"a <{ti}>- castle, <alf>++",
        *([] if name == "tiny_sdxl" else [WEIGHTED_AND]),  # SDXL: see test_a_weighted_and_on_sdxl
    ]


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sdxl"])
def pipe(request, tiny_cache: Path):
    name = request.param
    folder = next(tiny_cache.glob(f"*/{name}/main/{name}"))
    tis = tuple(EmbeddingFile(p.stem, p) for p in sorted((folder.parent.parent / "embedding").iterdir()))
    spec = ModelSpec(name, "sdxl" if "xl" in name else "sd-1", folder, "", embeddings=tis)
    pipe = load_pipeline(spec, "cpu", torch.float32)
    register_embeddings(pipe, spec)
    pipe.tiny_name = name
    pipe.base_record = BY_NAME[spec.base]  # what PromptCache is built with
    return pipe


def _xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _reference(pipe, text: str, clip_skip: int = 1, truncate: bool = False):
    """compel as its README uses it: Compel on the SD1 encoder, CompelForSDXL (or, truncating, the two-encoder
    Compel with requires_pooled=[False, True]) on SDXL."""
    ti = DiffusersTextualInversionManager(pipe)
    with torch.no_grad():
        if _xl(pipe):
            if not truncate:
                out = CompelForSDXL(pipe, textual_inversion_manager=ti)(text)
                return out.embeds, out.pooled_embeds
            compel = Compel(
                tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                requires_pooled=[False, True],
                textual_inversion_manager=ti,
                truncate_long_prompts=True,
            )
            return compel(text)
        layer = {
            1: ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
            2: ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
        }[clip_skip]
        compel = Compel(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            textual_inversion_manager=ti,
            returned_embeddings_type=layer,
            truncate_long_prompts=truncate,
        )
        with clip_skip_alias(pipe):
            return compel(text), None


def _skips(pipe) -> list[int]:
    return [1] if _xl(pipe) else [1, 2]


def test_compel_encode_is_what_compel_builds(pipe) -> None:
    for clip_skip in _skips(pipe):
        for text in _texts(pipe.tiny_name):
            hidden, pooled = compel_encode(pipe, pipe.base_record, text, clip_skip, False)
            theirs, their_pooled = _reference(pipe, text, clip_skip)
            assert hidden.shape == theirs.shape, text
            assert torch.equal(hidden, theirs), (text, clip_skip, (hidden - theirs).abs().max())
            if _xl(pipe):
                assert pooled.shape == (1, 1280) and torch.equal(pooled, their_pooled), text
            else:
                assert pooled is None
    assert not hasattr(pipe.text_encoder, "text_model")  # the clip-skip alias lived for the call only


@pytest.mark.parametrize("pipe", ["tiny_sdxl"], indirect=True)
def test_a_weighted_and_on_sdxl_is_compels_parts_where_compel_itself_fails(pipe) -> None:
    """compel 2.5.1's SDXL objects (requires_pooled) raise on an .and() with a part weight other than 1;
    compel_encode builds it from compel's own parts: each encoder's Compel and the pooled output compel adds."""
    assert _xl(pipe)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'shape'"):
        _reference(pipe, WEIGHTED_AND)
    hidden, pooled = compel_encode(pipe, pipe.base_record, WEIGHTED_AND, 1, False)
    ti = DiffusersTextualInversionManager(pipe)
    with torch.no_grad():
        compels = [
            Compel(
                tokenizer=tokenizer,
                text_encoder=encoder,
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                textual_inversion_manager=ti,
                truncate_long_prompts=False,
            )
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        ]
        theirs = torch.cat([c(WEIGHTED_AND) for c in compels], dim=-1)
        their_pooled = compels[1].conditioning_provider.get_pooled_embeddings([WEIGHTED_AND])
    assert hidden.shape == (1, 154, 2048) and torch.equal(hidden, theirs)
    assert torch.equal(pooled, their_pooled)
    unweighted, _ = compel_encode(pipe, pipe.base_record, AND, 1, False)
    assert not torch.allclose(hidden[:, 77:], unweighted[:, 77:], atol=1e-3)
    assert torch.equal(hidden[:, :77], unweighted[:, :77])


def test_the_syntax_changes_the_conditioning(pipe) -> None:
    plain, _ = compel_encode(pipe, pipe.base_record, "a castle at night", 1, False)
    for text in ("a castle+ at night", "(a castle)1.3 at night", BLEND):
        hidden, _ = compel_encode(pipe, pipe.base_record, text, 1, False)
        assert hidden.shape == plain.shape
        assert (hidden - plain).abs().max() > 1e-2, text
    # .and() puts its parts one after the other, a 77-token block each; a long text is in compel's chunks.
    assert compel_encode(pipe, pipe.base_record, AND, 1, False)[0].shape[1] == 154
    assert compel_encode(pipe, pipe.base_record, LONG, 1, False)[0].shape[1] == 231
    width = 2048 if _xl(pipe) else 768
    assert compel_encode(pipe, pipe.base_record, LONG, 1, True)[0].shape == (1, 77, width)


def test_truncation_is_compels_cut_at_77_tokens(pipe) -> None:
    for text in (LONG, f"{LONG}, (river)1.4", "(a castle)1.3 at night"):
        hidden, pooled = compel_encode(pipe, pipe.base_record, text, 1, True)
        theirs, their_pooled = _reference(pipe, text, truncate=True)
        assert hidden.shape[1] == 77 and torch.equal(hidden, theirs), text
        if _xl(pipe):
            assert torch.equal(pooled, their_pooled)


def test_a_text_encodes_the_same_whatever_was_encoded_before(pipe) -> None:
    text = f"(a <{TI[pipe.tiny_name]}> castle)1.3 at night, (moon)0.5"
    first, _ = compel_encode(pipe, pipe.base_record, text, 1, False)
    for other in (LONG, BLEND, AND, "x+++", ""):
        compel_encode(pipe, pipe.base_record, other, 1, False)
    again, _ = compel_encode(pipe, pipe.base_record, text, 1, False)
    assert torch.equal(first, again)


def test_a_text_encoder_changed_in_place_is_read_anew(pipe) -> None:
    """A text-encoder LoRA is patched into the weights in place; compel's cached empty-text encoding (the base of
    every weight) must follow it."""
    text = "(a castle)1.3 at night, (moon)0.5"
    before, _ = compel_encode(pipe, pipe.base_record, text, 1, False)
    weight = pipe.text_encoder.get_input_embeddings().weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        after, _ = compel_encode(pipe, pipe.base_record, text, 1, False)
        theirs, _ = _reference(pipe, text)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(after, theirs)
    assert torch.equal(compel_encode(pipe, pipe.base_record, text, 1, False)[0], before)


def test_a_multi_vector_ti_is_expanded_into_its_vectors(pipe) -> None:
    ti = TI[pipe.tiny_name]
    compel_encode(pipe, pipe.base_record, "a castle", 1, False)  # builds the compel objects
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if _xl(pipe) else [pipe.tokenizer]
    for compel, tokenizer in zip(_READERS[pipe]._for(1, False), tokenizers, strict=True):
        (ids,) = compel.conditioning_provider.get_token_ids([f"a <{ti}> castle"])
        a, castle = tokenizer.encode("a castle", add_special_tokens=False)
        vectors = tokenizer.convert_tokens_to_ids([f"<{ti}>", f"<{ti}>_1"])
        assert ids == [tokenizer.bos_token_id, a, *vectors, castle, tokenizer.eos_token_id]
    with_ti, _ = compel_encode(pipe, pipe.base_record, f"a <{ti}> castle", 1, False)
    first_only, _ = compel_encode(pipe, pipe.base_record, f"a <{ti}>_1 castle", 1, False)
    assert not torch.allclose(with_ti, first_only, atol=1e-3)


def _diffusers(pipe, text: str, clip_skip: int):
    with torch.no_grad():
        if _xl(pipe):
            hidden, _, pooled, _ = pipe.encode_prompt(prompt=[text], device="cpu", do_classifier_free_guidance=False)
            return hidden, pooled
        with clip_skip_alias(pipe):
            hidden, _ = pipe.encode_prompt([text], "cpu", 1, False, clip_skip=clip_skip - 1 or None)
        return hidden, None


def test_a_text_without_syntax_is_bitwise_what_diffusers_encodes(pipe) -> None:
    """Measured on CPU float32 (transformers 5.24, diffusers 0.42.1, compel 2.5.1): max |difference| 0.0 for short
    texts, TIs, clip skip 2 and the first chunk of a long text. compel passes an all-ones attention mask that
    diffusers does not; it changes nothing here."""
    texts = ["a castle at night", "", f"a <{TI[pipe.tiny_name]}> castle", LONG]
    for clip_skip in _skips(pipe):
        for text in texts:
            hidden, pooled = compel_encode(pipe, pipe.base_record, text, clip_skip, False)
            theirs, their_pooled = _diffusers(pipe, text, clip_skip)
            assert torch.equal(hidden[:, :77], theirs), (text, clip_skip, (hidden[:, :77] - theirs).abs().max())
            if _xl(pipe):
                assert torch.equal(pooled, their_pooled)


def test_a_long_text_without_syntax_is_what_the_a1111_path_encodes(pipe) -> None:
    """LONG has no punctuation, and each of its words is one token, so compel's word-boundary chunks are A1111's
    75-token ones; with punctuation they differ (compel splits at the last '.', then ',' before token 75)."""
    job = Job("0" * 16, "m", LONG, "", 1, 2, 1.0, 64, 64, lora_state=LoraState())
    ours = PromptCache(pipe, pipe.base_record).embeds([job])[0].first
    hidden, pooled = compel_encode(pipe, pipe.base_record, LONG, 1, False)
    assert hidden.shape == ours.prompt.shape
    torch.testing.assert_close(hidden, ours.prompt, rtol=0, atol=1e-5)
    if _xl(pipe):
        torch.testing.assert_close(pooled, ours.pooled, rtol=0, atol=1e-5)


def test_compel_errors_are_one_line_batchgen_errors(pipe) -> None:
    cases = {
        '("a", "b").blend(0.7)': (
            'prompt_syntax=compel: cannot parse prompt \'("a", "b").blend(0.7)\': while parsing Blend: mismatched '
            "prompts/weights counts [Prompt:[Fragment:'a'@1.0], Prompt:[Fragment:'b'@1.0]], [0.7]; fix the compel "
            "syntax or use prompt_syntax=a1111"
        ),
        '("a", "b").blend(0.7, 0.3) and more': (
            'prompt_syntax=compel: cannot parse prompt \'("a", "b").blend(0.7, 0.3) and more\': Expected end of '
            "text, found 'and' (at char 27), (line:1, col:28); fix the compel syntax or use prompt_syntax=a1111"
        ),
        'a ("cat").swap("dog") at night': (
            'prompt_syntax=compel: prompt \'a ("cat").swap("dog") at night\' uses .swap() (cross-attention '
            "control), which diffusers pipelines cannot apply; use A1111's prompt editing [from:to:when] under "
            "prompt_syntax=a1111"
        ),
        "a castle withLora(detail, 0.8)": (
            "prompt_syntax=compel: prompt 'a castle withLora(detail, 0.8)' asks for a LoRA with withLora(); "
            "batchgen applies LoRAs from sweep.loras (or A1111's <lora:name:weight> under prompt_syntax=a1111): "
            "remove withLora() from the prompt"
        ),
    }
    for text, message in cases.items():
        with pytest.raises(BatchgenError) as error:
            compel_encode(pipe, pipe.base_record, text, 1, False)
        assert str(error.value) == message
    base = pipe.base_record.name
    skip = 2 if _xl(pipe) else 3
    with pytest.raises(BatchgenError) as error:
        compel_encode(pipe, pipe.base_record, "a castle", skip, False)
    assert str(error.value) == f"prompt_syntax=compel cannot read clip_skip {skip} on {base}; use prompt_syntax=a1111"


def test_check_compel_refuses_what_compel_has_no_layer_for() -> None:
    for base, skip in (("sd-1", 1), ("sd-1", 2), ("sd-2", 1), ("sd-2", 2), ("sdxl", 1)):
        check_compel(base, skip, "job 3")  # no error
    cases = {
        ("sd-1", 3): "offers clip_skip 1 or 2 on sd-1 (asked: 3)",
        ("sd-2", 12): "offers clip_skip 1 or 2 on sd-2 (asked: 12)",
        ("sdxl", 2): "offers clip_skip 1 on sdxl (asked: 2)",
    }
    for (base, skip), middle in cases.items():
        with pytest.raises(BatchgenError) as error:
            check_compel(base, skip, "sweep.clip_skip")
        assert str(error.value) == (
            f"sweep.clip_skip: prompt_syntax=compel {middle}; use prompt_syntax=a1111 for a deeper clip skip"
        )
    with pytest.raises(BatchgenError) as error:
        check_compel("sd-3", 1, "model m")
    assert (
        str(error.value)
        == "model m: prompt_syntax=compel is not set up for base 'sd-3'; use prompt_syntax=a1111 or plain"
    )
