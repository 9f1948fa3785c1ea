"""Performance features never change an image: batching, ordering, subsets; plus the prompt cache and timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batchgen.config import compose_config
from batchgen.engine.worker import Renderer, batches
from batchgen.runner import prepare
from batchgen.spec import STAGES

SWEEP = ("+sweep=styles", "~sweep.stacks.lycoris", "sweep.steps=3")


def _hashes(run: str) -> dict[str, str]:
    table = pd.read_csv(Path(run) / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(table["status"]) == {"ok"}
    return dict(zip(table["job_id"], table["image_sha256"], strict=True))


def _pixels(run: str, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(Path(run) / "images" / f"{job_id}.png").convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_same_job_same_pixels_whatever_the_batch_or_the_neighbours(run_cli) -> None:
    assert run_cli(*SWEEP, "run.out_dir=auto")[0] == 0  # batch_size auto: 4 on CPU
    # a subset rendered alone, in another order (seed axis reversed, one model), gives the same bytes
    assert run_cli(*SWEEP, "sweep.models=[tiny_sdxl]", "sweep.seeds=[2,1]", "run.out_dir=sub")[0] == 0
    single, alone = _hashes("auto"), _hashes("sub")
    assert len(single) == 60 and len(alone) == 30
    assert all(single[job] == sha for job, sha in alone.items())  # PNG bytes: a function of pixels and job
    # batches of 1 and of 5 (odd sizes, mixed prompts and seeds in one call) give the same bytes
    assert run_cli(*SWEEP, "sweep.batch_size=1", "run.out_dir=b1")[0] == 0
    assert run_cli(*SWEEP, "sweep.batch_size=5", "run.out_dir=b5")[0] == 0
    assert _hashes("b1") == single == _hashes("b5")


def test_batches_group_only_compatible_neighbours(tiny_cache: Path) -> None:
    plan = prepare(compose_config([*SWEEP, "sweep.steps=[3,4]"]))
    groups = list(batches(plan.jobs, 4))
    assert sum(len(g) for g in groups) == len(plan.jobs) == 120
    for group in groups:
        assert len(group) <= 4
        assert len({(j.model, j.loras, j.steps, j.guidance_scale, j.width, j.height, j.scheduler) for j in group}) == 1
    # 2 models x 5 LoRA states x 2 step counts, each 6 jobs -> batches of 4 + 2
    assert len(groups) == 2 * 5 * 2 * 2


@pytest.mark.slow
def test_prompts_encode_once_per_text_encoder_state(tiny_cache: Path) -> None:
    composed = compose_config(
        [
            "+sweep=styles",
            "~sweep.stacks.lycoris",
            "~sweep.stacks.peft",
            "~sweep.stacks.ink_grain",
            "sweep.stacks.ink.ink=[{unet: 0.5, text_encoder: 1.0},{unet: 1.0, text_encoder: 1.0}]",
            "sweep.models=[tiny_sd1]",
            "sweep.seeds=[1,2,3]",
            "sweep.steps=2",
        ]
    )
    plan = prepare(composed)
    renderer = Renderer(plan.models)
    results = list(renderer.render(plan.jobs))
    assert len(results) == 3 * 3 * 3 and all(not r.error for r in results)
    # 3 prompts x 2 text-encoder states (none, ink te=1.0): UNet-only changes and seeds reuse the encoding
    cache = renderer._loaded.prompts.cache
    # (plus the negative prompt once per state), each new text encoded by the batch that first needs it
    assert cache.misses == 2 * (3 + 1)
    # per state 9 jobs, prompt-major, in batches of 4: the first batch brings two prompts and the negative, the
    # second the third prompt; the other ink state shares the text-encoder state and encodes nothing
    assert cache.rounds == 2 * 2
    # cached embeddings carry no autograd history, which would keep every encoder activation alive
    assert all(e.hidden.grad_fn is None and e.hidden.is_inference() for e in cache.encodings())


def test_manifest_records_stage_timings(run_cli) -> None:
    args = ("+sweep=styles", "~sweep.stacks.lycoris", "~sweep.stacks.peft", "~sweep.stacks.ink_grain")
    one = ("~sweep.stacks.ink", "sweep.models=[tiny_sd1]", "sweep.prompts=[a castle]", "sweep.batch_size=1")
    code, out, _ = run_cli(*args, *one)
    assert code == 0
    stages_line = next(line for line in out.splitlines() if line.startswith("stages: "))
    assert [part.split()[0] for part in stages_line[len("stages: ") :].split(", ")] == list(STAGES)
    table = pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 2
    for i, row in enumerate(table.itertuples()):
        timings = dict(part.split("=") for part in row.timings.split(";"))
        # only the first image pays for loading the model
        assert list(timings) == [stage for stage in STAGES if i == 0 or stage != "load"]
        assert abs(sum(map(float, timings.values())) - float(row.seconds)) < 1e-3


def test_per_image_rows_run_each_image_as_a_batch_of_one_would() -> None:
    import torch

    from batchgen.engine.rows import isolate_image_rows

    torch.manual_seed(0)
    unet = torch.nn.Module()
    unet.time_embedding = torch.nn.Linear(320, 1280)
    unet.other = torch.nn.Linear(320, 1280)
    reference = torch.nn.Linear(320, 1280)
    reference.load_state_dict(unet.time_embedding.state_dict())
    rows = isolate_image_rows(unet, ("time_embedding",), optional=("add_embedding",))
    uncond, cond = torch.randn(3, 320), torch.randn(3, 320)
    with torch.inference_mode():
        stacked = torch.cat([uncond, cond])  # guidance layout: [uncond x 3, cond x 3]
        out = rows.holding(3, lambda: unet.time_embedding(stacked))
        for i in range(3):
            alone = reference(torch.stack([uncond[i], cond[i]]))
            assert torch.equal(out[[i, i + 3]], alone)
        # the timestep layers' case: every image brings the same rows, computed once as a batch of one would
        same = torch.cat([uncond[:1].expand(3, -1), cond[:1].expand(3, -1)])
        out = rows.holding(3, lambda: unet.time_embedding(same))
        alone = reference(torch.stack([uncond[0], cond[0]]))
        assert all(torch.equal(out[[i, i + 3]], alone) for i in range(3))
        # outside a call that holds several images the layer is the plain one: six rows are six rows
        assert rows.images == 1 and torch.equal(unet.time_embedding(stacked), reference(stacked))
    # untouched layers stay plain modules
    assert "forward" not in vars(unet.other) and "forward" in vars(unet.time_embedding)


def test_per_image_rows_fail_loudly_when_an_expected_layer_is_gone() -> None:
    import torch

    from batchgen.engine.rows import UNET_PER_IMAGE, isolate_image_rows

    unet = torch.nn.Module()
    unet.time_embedding = torch.nn.Linear(4, 4)  # but no resnet's time_emb_proj: as if diffusers renamed it
    with pytest.raises(RuntimeError) as error:
        isolate_image_rows(unet, UNET_PER_IMAGE)
    assert str(error.value) == (
        "Module has no module named time_emb_proj, which batchgen runs image by image so that batching never "
        "changes pixels; this diffusers/transformers version renamed it: update the names in "
        "batchgen/engine/rows.py, or pin the version batchgen was tested with"
    )


def _cache_job(*loras: str, component: str = "text_encoder", truncate: bool = False):
    from batchgen.spec import Contribution, Job, LoraState

    state = LoraState(((component, tuple(Contribution(name, 1.0) for name in loras)),) if loras else ())
    return Job("0" * 16, "m", "a castle", "", 1, 2, 7.5, 64, 64, truncate_prompts=truncate, lora_state=state)


def _truncation(job) -> bool:
    return job.truncate_prompts


def _encode_counting(encoded: list):
    import torch

    from batchgen.engine.conditioning import Encoded

    def encode(units: list) -> list:
        encoded.extend(units)
        return [Encoded(torch.zeros(1, 1, 1), None) for _ in units]

    return encode


def test_the_conditioning_cache_forgets_text_encoder_states_left_behind() -> None:
    # Memory must stay flat in the number of LoRAs: a sweep's stacks come one after another, so only the current
    # text-encoder state and the pristine one (shared by every UNet-only stack) are worth keeping.
    from batchgen.engine.conditioning_cache import ConditioningCache

    cache, encoded = ConditioningCache(), []
    encode = _encode_counting(encoded)
    misses = []
    for job in (
        _cache_job("ink", component="unet"),  # a UNet-only LoRA: the pristine text-encoder state
        _cache_job("a"),
        _cache_job("b"),  # forgets a, keeps the pristine encoding
        _cache_job("a"),  # encoded again; forgets b
        _cache_job(),  # the pristine encoding is still there; a's goes
        _cache_job("a"),
    ):
        cache.open([job], _truncation, "truncation").ensure(["a castle"], encode)
        misses.append(cache.misses)
    assert misses == [1, 2, 3, 4, 4, 5]
    assert cache.rounds == 5 and encoded == ["a castle"] * 5
    assert len(cache.encodings()) == 2  # the pristine state's and a's


def test_the_conditioning_cache_keys_on_the_mode_and_evicts_the_least_recently_used() -> None:
    from batchgen.engine.conditioning_cache import ConditioningCache

    cache, encoded = ConditioningCache(max_entries=2), []
    encode = _encode_counting(encoded)
    mode = _truncation
    lookup = cache.open([_cache_job()], mode, "truncation")
    lookup.ensure(["x", "y", "x"], encode)  # one round, each unit once
    cut = cache.open([_cache_job(truncate=True)], mode, "truncation")
    cut.ensure(["x"], encode)  # another mode: another encoding
    assert encoded == ["x", "y", "x"] and cache.rounds == 2
    lookup.touch(["x"])
    cache.trim()  # three entries, room for two: y, the least recently used, goes
    lookup.ensure(["x"], encode)
    assert encoded == ["x", "y", "x"]
    lookup.ensure(["y"], encode)
    assert encoded == ["x", "y", "x", "y"]
    with pytest.raises(RuntimeError, match="^a batch mixes truncation; batches must be cut by batch_key$"):
        cache.open([_cache_job(), _cache_job(truncate=True)], mode, "truncation")
    with pytest.raises(RuntimeError, match="^a batch spans text-encoder states; batches must be cut by batch_key$"):
        cache.open([_cache_job(), _cache_job("a")], mode, "truncation")


def test_the_denoiser_call_rides_in_the_pipelines_attention_kwargs_and_never_reaches_diffusers() -> None:
    import torch

    from batchgen.engine.denoiser_call import KEY, DenoiserCall
    from batchgen.engine.passes import wrap_unet

    class Unet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time_embedding, self.time_emb_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.seen: list = []

        def forward(self, sample, timestep, encoder_hidden_states=None, cross_attention_kwargs=None, return_dict=True):
            self.seen.append((sample.shape[0], encoder_hidden_states.shape[1], cross_attention_kwargs))
            return (sample,)

    unet = Unet()
    wrap_unet(unet)
    sample, hidden = torch.zeros(4, 1), torch.zeros(4, 5, 8)
    given = {KEY: DenoiserCall(images=2, lengths=(3, 5)), "scale": 0.5}
    unet(sample, 1, encoder_hidden_states=hidden, cross_attention_kwargs=given, return_dict=False)
    # two passes of the two images, uncond at its 3 tokens, cond at 5; diffusers gets the caller's own entries only
    assert unet.seen == [(2, 3, {"scale": 0.5}), (2, 5, {"scale": 0.5})]
    assert KEY in given  # the pipeline hands the same dict to every step
    unet.seen.clear()
    unet(sample, 1, encoder_hidden_states=hidden, cross_attention_kwargs={KEY: DenoiserCall(images=4)})
    unet(sample, 1, encoder_hidden_states=hidden)  # no batchgen call: diffusers' forward as it is
    assert unet.seen == [(4, 5, None), (4, 5, None)]
