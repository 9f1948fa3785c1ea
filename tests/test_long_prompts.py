"""Prompts past the encoder's 77 tokens: chunked as A1111 does (never a silent cut), or truncated with a warning."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from batchgen.assets.bases import BY_NAME
from batchgen.engine.pipeline import load_pipeline
from batchgen.engine.prompts import PromptCache
from batchgen.spec import Job, LoraState, ModelSpec
from tests.reference import clip_skip_alias

LONG = " ".join(["a castle at night with towers and a river and the moon over the hills"] * 8)


def _job(prompt: str, negative: str = "", truncate: bool = False, clip_skip: int = 1, pad: bool = False) -> Job:
    return Job(
        "0" * 16,
        "m",
        prompt,
        negative,
        1,
        2,
        7.5,
        64,
        64,
        truncate_prompts=truncate,
        clip_skip=clip_skip,
        pad_prompts=pad,
        lora_state=LoraState(),
    )


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sdxl"])
def pipe(request, tiny_cache: Path):
    folder = next(tiny_cache.glob(f"*/{request.param}/main/{request.param}"))
    spec = ModelSpec(request.param, "sdxl" if "xl" in request.param else "sd-1", folder, "")
    pipe = load_pipeline(spec, "cpu", torch.float32)
    pipe.base_record = BY_NAME[spec.base]  # what PromptCache is built with
    return pipe


def test_a_long_prompt_is_encoded_in_77_token_chunks(pipe) -> None:
    tokens = len(pipe.tokenizer(LONG, truncation=False).input_ids) - 2
    assert tokens > 150  # three chunks of 75
    cache = PromptCache(pipe, pipe.base_record)
    (separate,) = cache.embeds([_job(LONG, "blurry")])
    (padded,) = cache.embeds([_job(LONG, "blurry", pad=True)])
    assert separate.first.prompt.shape[1] == 77 * 3
    assert separate.first.negative.shape[1] == 77  # A1111's default: each side at its own length, its own pass
    assert separate.signature == ((2, 77 * 3, 77),)
    embeds = padded.first
    torch.testing.assert_close(embeds.prompt, separate.first.prompt, rtol=0, atol=0)
    assert embeds.negative.shape == embeds.prompt.shape  # pad_prompts: the short negative padded with empty chunks
    # The first chunk is what diffusers gives for the prompt cut at 75 tokens; the padding is the empty text's.
    if getattr(pipe, "text_encoder_2", None) is not None:
        cut, _, pooled, _ = pipe.encode_prompt(prompt=[LONG], device="cpu", do_classifier_free_guidance=False)
        empty, *_ = pipe.encode_prompt(prompt=[""], device="cpu", do_classifier_free_guidance=False)
        torch.testing.assert_close(embeds.pooled, pooled, rtol=0, atol=1e-5)
    else:
        cut, _ = pipe.encode_prompt([LONG], "cpu", 1, False)
        empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(embeds.prompt[:, :77], cut, rtol=0, atol=1e-5)
    assert not torch.allclose(embeds.prompt[:, 77:154], cut, atol=1e-3)
    torch.testing.assert_close(embeds.negative[:, 77:154], empty, rtol=0, atol=1e-5)
    (short,) = cache.embeds([_job("a castle", "blurry")])
    assert short.signature == ((2, 77, 77),) and short.simple
    # chunked encodings are cached without autograd history too, which would keep every activation alive
    assert all(e.hidden.is_inference() for e in cache.cache.encodings())


def test_clip_skip_reads_the_same_layer_in_chunks_as_diffusers_does(pipe) -> None:
    cache = PromptCache(pipe, pipe.base_record)
    long, short, plain, cut = (
        c.first
        for c in (
            *cache.embeds([_job(LONG, clip_skip=2)]),
            *cache.embeds([_job("a castle", clip_skip=2)]),
            *cache.embeds([_job("a castle")]),
            *cache.embeds([_job(LONG, truncate=True, clip_skip=2)]),
        )
    )
    assert cut.prompt.shape[1] == 77
    torch.testing.assert_close(cut.prompt, long.prompt[:, :77], rtol=0, atol=1e-5)  # the first chunk, cut
    xl = getattr(pipe, "text_encoder_2", None) is not None
    for text, ours in ((LONG, long.prompt[:, :77]), ("a castle", short.prompt)):
        if xl:
            theirs, *_ = pipe.encode_prompt(
                prompt=[text], device="cpu", do_classifier_free_guidance=False, clip_skip=1
            )
        else:
            with clip_skip_alias(pipe):
                theirs, _ = pipe.encode_prompt([text], "cpu", 1, False, clip_skip=1)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(short.prompt, plain.prompt, atol=1e-3)  # another layer: other conditioning


def test_truncation_cuts_at_77_tokens_with_a_warning(pipe, capsys) -> None:
    (conditioning,) = PromptCache(pipe, pipe.base_record).embeds([_job(LONG, "", truncate=True)])
    assert conditioning.first.prompt.shape[1] == 77
    tokens = len(pipe.tokenizer(LONG, truncation=False).input_ids) - 2
    err = capsys.readouterr().err
    assert f" is {tokens} tokens; the encoder reads the first 77 (run.truncate_prompts=true)" in err


def _sweep(conf: Path, name: str, model: str, batch: int, truncate: bool = False) -> None:
    (conf / "sweep").mkdir(parents=True, exist_ok=True)
    (conf / "sweep" / f"{name}.yaml").write_text(
        f"# @package _global_\ndefaults:\n  - /model@models.{model}: {model}\n"
        f"sweep:\n  name: {name}\n  prompts: ['{LONG}', 'a castle at night']\n  negative_prompt: blurry\n"
        f"  seeds: [1]\n  steps: 2\n  width: 64\n  height: 64\n  batch_size: {batch}\n"
        f"run:\n  truncate_prompts: {str(truncate).lower()}\n"
    )


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sdxl"])
def test_long_and_short_prompts_in_one_batch_give_their_own_images(run_cli, tmp_path: Path, model: str) -> None:
    conf = tmp_path / "conf"
    for name, batch, truncate in (("one", 1, False), ("two", 2, False), ("cut", 2, True)):
        _sweep(conf, name, model, batch, truncate)
        code, _, err = run_cli("--config-dir", str(conf), f"+sweep={name}")
        assert code == 0, err
    runs = {
        n: pd.read_csv(tmp_path / "runs" / n / "manifest.csv", keep_default_na=False) for n in ("one", "two", "cut")
    }
    one, two, cut = (runs[n].set_index("prompt") for n in ("one", "two", "cut"))
    assert set(one["status"]) == set(two["status"]) == {"ok"}
    for prompt in (LONG, "a castle at night"):
        assert one.loc[prompt, "job_id"] == two.loc[prompt, "job_id"]
        assert one.loc[prompt, "image_sha256"] == two.loc[prompt, "image_sha256"]
    # Truncation is another job (it is in job_id) and, for the long prompt, another image.
    assert cut.loc[LONG, "job_id"] != one.loc[LONG, "job_id"]
    assert cut.loc[LONG, "image_sha256"] != one.loc[LONG, "image_sha256"]
