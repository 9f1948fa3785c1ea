"""`batchgen rank`, the trade-off plot and check's metric thresholds, on a synthetic manifest whose clip_t, clip_i,
dino_i and reference_* cells are written by hand (the values are powers-of-two fractions, so medians are exact)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from PIL import Image

from batchgen.manifest import Manifest, read_latest, record_invocation
from batchgen.report.rank import Curve, TradeoffPoint, rank, tradeoff_curves
from tests.synthetic import make_run, write_manifest

METRIC_COLUMNS = ("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i")
P1, P2 = "a castle", "a knight"
RUN = "runs/m"


CONCEPTS = {"ink": "/data/ink", "alf": "/data/alf"}


def _build(run: Path, concepts: dict[str, str] | None = CONCEPTS) -> None:
    """m1: four no-LoRA references; LoRA ink at 0.5 and 1; a stack of ink and grain; a glob's two epochs of mylora
    (P1 only); a TI-only job pair (alf has concept images, cartoona none). m2: ink 0.5 measured by effect only."""
    rows: list[dict[str, str]] = []

    def add(model: str, stack: str, loras: str, prompt: str, seed: int, **cells: object) -> str:
        job_id = f"{len(rows):016x}"
        rows.append(
            {
                "job_id": job_id,
                "status": "ok",
                "model": model,
                "base": "sd-1",
                "stack": stack,
                "loras": loras,
                "prompt": prompt,
                "prompt_template": prompt,
                "seed": str(seed),
                "image": f"images/{job_id}.png",
                **{k: str(v) for k, v in cells.items()},
            }
        )
        return job_id

    keys = [(P1, 1), (P1, 2), (P2, 1), (P2, 2)]
    refs = {key: add("m1", "(reference)", "", *key, clip_t=t) for key, t in zip(keys, [30, 31, 28, 29], strict=True)}
    for loras, clip_i, dino_i, clip_t, effect in [
        ("ink:0.5", [0.5, 0.625, 0.75, 0.875], [0.25, 0.25, 0.5, 0.5], [29, 30, 27, 28], [10, 12, 14, 16]),
        ("ink:1", [0.75, 0.875, 0.875, 1.0], [0.5, 0.5, 0.75, 0.75], [26, 27, 24, 25], [20, 22, 24, 26]),
    ]:
        for key, *measured in zip(keys, clip_i, dino_i, clip_t, effect, strict=True):
            cells = dict(zip(("clip_i", "dino_i", "clip_t", "effect"), measured, strict=True))
            add("m1", "ink", loras, *key, reference=refs[key], reference_clip_i=0.25, reference_dino_i=0.125, **cells)
    for key in keys:
        cells = {"clip_i": 0.5, "dino_i": 0.25, "clip_t": 28, "effect": 30}
        add("m1", "ink_grain", "grain:1;ink:1", *key, reference=refs[key], reference_clip_i=0.25, **cells)
        rows[-1]["reference_dino_i"] = "0.125"
    for name, epoch, clip_i, clip_t in [
        ("mylora-000001", "mylora e1", [0.5, 0.75], [30, 31]),
        ("mylora-000002", "mylora e2", [0.75, 1.0], [29, 30]),
    ]:
        for key, i, t in zip(keys[:2], clip_i, clip_t, strict=True):
            add(
                "m1",
                "epochs",
                f"{name}:1",
                *key,
                epoch=epoch,
                reference=refs[key],
                reference_clip_i=0.25,
                clip_i=i,
                clip_t=t,
            )
    for seed, clip_t in [(1, 25), (2, 26)]:
        add("m1", "none", "", "<alf> in <cartoona> style", seed, embeddings="alf;cartoona", clip_i=0.5, clip_t=clip_t)
    for seed in (1, 2):
        add("m2", "ink", "ink:0.5", P1, seed, effect=5)
    (run / "images").mkdir(parents=True)
    for i, row in enumerate(rows):
        Image.new("RGB", (8, 8), (i * 9, 100, 50)).save(run / row["image"])
    manifest = Manifest(run, METRIC_COLUMNS)  # the metric columns as prompt slots until the manifest has them
    for row in rows:
        manifest.append(row)
    manifest.close()
    if concepts is not None:
        metrics = {"clip": "/models/clip", "dino": "/models/dino", "concepts": concepts}
        record_invocation(run, {"sweep": {"name": "m", "metrics": metrics}}, [])


CSV_HEAD = (
    "model,kind,name,rank,front,state,images,clip_i_median,clip_i_min,clip_i_max,dino_i_median,dino_i_min,dino_i_max,"
    "clip_t_median,clip_t_min,clip_t_max,effect_median,effect_min,effect_max,clip_i_gain_median,clip_i_gain_min,"
    "clip_i_gain_max,dino_i_gain_median,dino_i_gain_min,dino_i_gain_max,clip_t_gain_median,clip_t_gain_min,"
    "clip_t_gain_max\n"
)


def test_rank_csv_medians_ranges_gains_front_and_order(tmp_path: Path, cli) -> None:
    _build(tmp_path / RUN)
    code, out, err = cli("rank", RUN, "--csv")
    assert (code, err) == (0, "")
    # ink 0.5: clip_i 0.5 .625 .75 .875 (median .6875), each minus the reference's 0.25; clip_t 29 30 27 28 against
    # references 30 31 28 29 (gain -1 each). ink 1 has the higher clip_i, ink 0.5 the higher clip_t: both on the
    # front; ink_grain (0.5, 28) is below ink 0.5 on both. The front is ordered by clip_i gain: ink 1 first.
    # clip_t gain of ink_grain: 28 - (30, 31, 28, 29) = -2 -3 0 -1, median -1.5. ink_grain counts under grain
    # too, alone on its front. A glob's epoch files count as one LoRA, mylora (no dino_i or effect measured for
    # them). TIs after LoRAs: alf has images in sweep.metrics.concepts, cartoona none and is left out; a job without
    # LoRAs has no reference, so no gain. m2 has no metric at all: nothing to rank it by.
    grain = "0.5,0.5,0.5,0.25,0.25,0.25,28.0,28.0,28.0,30.0,30.0,30.0,0.25,0.25,0.25,0.125,0.125,0.125,-1.5,-3.0,0.0"
    assert out == CSV_HEAD + (
        f"m1,LoRA,grain,1,true,ink_grain,4,{grain}\n"
        "m1,LoRA,ink,1,true,ink 1,4,0.875,0.75,1.0,0.625,0.5,0.75,25.5,24.0,27.0,23.0,20.0,26.0,"
        "0.625,0.5,0.75,0.5,0.375,0.625,-4.0,-4.0,-4.0\n"
        "m1,LoRA,ink,2,true,ink 0.5,4,0.6875,0.5,0.875,0.375,0.25,0.5,28.5,27.0,30.0,13.0,10.0,16.0,"
        "0.4375,0.25,0.625,0.25,0.125,0.375,-1.0,-1.0,-1.0\n"
        f"m1,LoRA,ink,3,false,ink_grain,4,{grain}\n"
        "m1,LoRA,mylora,1,true,epochs: mylora e2,2,0.875,0.75,1.0,,,,29.5,29.0,30.0,,,,"
        "0.625,0.5,0.75,,,,-1.0,-1.0,-1.0\n"
        "m1,LoRA,mylora,2,true,epochs: mylora e1,2,0.625,0.5,0.75,,,,30.5,30.0,31.0,,,,0.375,0.25,0.5,,,,0.0,0.0,0.0\n"
        "m1,TI,alf,1,true,none,2,0.5,0.5,0.5,,,,25.5,25.0,26.0,,,,,,,,,,,,\n"
    )
    table = pd.read_csv(io.StringIO(out))  # as a machine reads it: numbers, booleans, blanks as NaN
    assert table["front"].tolist() == [True, True, True, False, True, True, True]
    assert table["clip_i_gain_median"].iloc[1:3].tolist() == [0.625, 0.4375]
    assert table["dino_i_median"].isna().tolist() == [False] * 4 + [True] * 3
    assert table["images"].sum() == 22


def test_rank_table_for_people(tmp_path: Path, cli) -> None:
    _build(tmp_path / RUN)
    code, out, _ = cli("rank", RUN)
    assert code == 0
    head = "  rank  front  state      images  clip_i                gain    dino_i                gain    clip_t  "
    assert out.splitlines()[:11] == [
        "rank runs/m:",
        "  median [min, max] over each state's jobs (prompts x seeds); gain: the median over those jobs of the job's "
        "value",
        "  minus its no-LoRA reference's; front *: no other state of the same LoRA has both higher concept fidelity "
        "and",
        "  higher clip_t; best first: the front, then by concept-fidelity gain; a job with several LoRAs or TIs "
        "counts",
        "  under each",
        "",
        "m1, LoRA grain (front: clip_i vs clip_t; reference (no LoRA): clip_i 0.250, dino_i 0.125, clip_t 29.50)",
        head + "              gain   effect",
        "  1     *      ink_grain  4       0.500 [0.500, 0.500]  +0.250  0.250 [0.250, 0.250]  +0.125  28.00 [28.00, "
        "28.00]  -1.50  30.00 [30.00, 30.00]",
        "",
        "m1, LoRA ink (front: clip_i vs clip_t; reference (no LoRA): clip_i 0.250, dino_i 0.125, clip_t 29.50)",
    ]
    assert out.splitlines()[12:14] == [
        "  1     *      ink 1      4       0.875 [0.750, 1.000]  +0.625  0.625 [0.500, 0.750]  +0.500  25.50 [24.00, "
        "27.00]  -4.00  23.00 [20.00, 26.00]",
        "  2     *      ink 0.5    4       0.688 [0.500, 0.875]  +0.438  0.375 [0.250, 0.500]  +0.250  28.50 [27.00, "
        "30.00]  -1.00  13.00 [10.00, 16.00]",
    ]
    assert out.endswith(
        "m1, TI alf (front: clip_i vs clip_t)\n"
        "  rank  front  state  images  clip_i                gain  dino_i  gain  clip_t                gain  effect\n"
        "  1     *      none   2       0.500 [0.500, 0.500]                      25.50 [25.00, 26.00]\n"
    )


def test_every_ti_is_ranked_when_the_run_recorded_no_concepts(tmp_path: Path) -> None:
    _build(tmp_path, concepts=None)
    names = [(g.kind, g.name) for g in rank(read_latest(tmp_path), concepts=None)]
    assert names == [("LoRA", "grain"), ("LoRA", "ink"), ("LoRA", "mylora"), ("TI", "alf"), ("TI", "cartoona")]


def test_rank_of_a_run_without_metrics_says_how_to_add_them(tmp_path: Path, cli) -> None:
    run = tmp_path / "runs" / "styles"
    write_manifest(run, make_run(run))
    code, out, err = cli("rank", "runs/styles")
    assert (code, out) == (2, "")
    assert err == (
        "batchgen: error: runs/styles: manifest.csv has no clip_t, clip_i or dino_i values to rank by; set "
        "sweep.metrics (a CLIP and/or DINO model folder, each LoRA's or TI's training images) and run "
        "`batchgen report runs/styles`\n"
    )
    code, _, err = cli("check", "runs/styles", "--min-clip-t", "20")
    assert code == 2
    assert err == (
        "batchgen: error: runs/styles: --min-clip-t: no job has a clip_t value in this run; set sweep.metrics and "
        "run `batchgen report runs/styles` to measure it, or drop --min-clip-t\n"
    )
    code, _, err = cli("rank", "runs/nowhere")
    assert (code, err) == (
        2,
        "batchgen: error: runs/nowhere: no manifest.csv here; pass a run directory such as runs/styles\n",
    )


def test_check_metric_thresholds(tmp_path: Path, cli) -> None:
    _build(tmp_path / RUN)
    code, out, _ = cli("check", RUN, "--min-clip-t", "24", "--min-clip-i", "0.5", "--min-dino-i", "0.25")
    assert code == 0
    assert out == (
        "check runs/m: ok; 22 jobs checked for clip_t >= 24, 18 jobs checked for clip_i >= 0.5, "
        "12 jobs checked for dino_i >= 0.25\n"
    )
    code, out, _ = cli("check", RUN, "--min-clip-t", "24.5", "--min-dino-i", "0.3")
    assert code == 1
    where = 'model m1, stack {}, prompt "{}", seed {} (job {:016x})'
    assert out.splitlines() == [
        "clip_t 24.000 < 24.5: " + where.format("ink 1", P2, 1, 10),
        "dino_i 0.250 < 0.3: " + where.format("ink 0.5", P1, 1, 4),
        "dino_i 0.250 < 0.3: " + where.format("ink 0.5", P1, 2, 5),
        *(
            "dino_i 0.250 < 0.3: " + where.format("ink_grain", p, s, 12 + i)
            for i, (p, s) in enumerate([(P1, 1), (P1, 2), (P2, 1), (P2, 2)])
        ),
        "check runs/m: 7 problems; 22 jobs checked for clip_t >= 24.5, 12 jobs checked for dino_i >= 0.3",
    ]
    code, _, err = cli("check", RUN, "--min-clip-i", "nan")
    assert (code, err) == (
        2,
        "batchgen: error: --min-clip-i nan: give a number, as the manifest's clip_i column holds\n",
    )
    code, _, err = cli("check", RUN)
    assert code == 2
    assert err == (
        "batchgen: error: check: nothing to check; give --min-effect N, --no-degenerate, --max-failed N, "
        "--min-clip-t N, --min-clip-i N and/or --min-dino-i N\n"
    )


def test_report_writes_the_tradeoff_plot_and_index_shows_it(tmp_path: Path, cli) -> None:
    _build(tmp_path / RUN, concepts=None)  # no sweep.metrics recorded: the report measures nothing, loads no model
    assert tradeoff_curves(read_latest(tmp_path / RUN)) == {
        # only single-LoRA stacks: ink_grain has no one weight to follow; the references' medians as a cross
        "m1": [
            Curve(
                "ink",
                [TradeoffPoint("0.5", 28.5, 0.6875), TradeoffPoint("1", 25.5, 0.875)],
                TradeoffPoint("reference", 29.5, 0.25),
            ),
            Curve(
                "mylora",
                [TradeoffPoint("e1", 30.5, 0.625), TradeoffPoint("e2", 29.5, 0.875)],
                TradeoffPoint("reference", 30.5, 0.25),
            ),
        ]
    }
    code, out, _ = cli("report", RUN)
    assert (code, out) == (0, "4 grids, 2 strength plots, 1 tradeoff plots, runs/m/index.html\n")
    plots = sorted(p.name for p in (tmp_path / RUN / "plots").iterdir())
    assert plots == ["strength-m1.png", "strength-m2.png", "tradeoff-m1.png"]  # m2 has no clip_i or clip_t
    assert Image.open(tmp_path / RUN / "plots" / "tradeoff-m1.png").size == (640, 480)
    page = (tmp_path / RUN / "index.html").read_text()
    assert '<h2>Concept vs prompt fidelity (1)</h2>\n<figure><a href="plots/tradeoff-m1.png">' in page
    assert 'src="plots/tradeoff-m1.png"' in page
