"""Run-directory durability: append-only rows, torn lines, widened headers, resume, hashing."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd

from batchgen.assets.hashing import HashCache
from batchgen.columns import MANIFEST_COLUMNS
from batchgen.manifest import Manifest, atomic_write, completed_jobs, read_manifest, record_invocation
from batchgen.progress import Progress


def _row(job_id: str, status: str = "ok", image: str = "", sha: str = "") -> dict:
    return {"job_id": job_id, "status": status, "image": image, "image_sha256": sha, "prompt": 'a, "quoted" cat'}


def test_header_then_rows_round_trip(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path, slots=["style"])
    manifest.append({**_row("a" * 16), "style": "ink", "seconds": 1.5, "guidance_scale": 7.0})
    manifest.close()
    table = read_manifest(tmp_path)
    assert list(table.columns) == [*MANIFEST_COLUMNS, "style"]
    assert table.loc[0, "prompt"] == 'a, "quoted" cat'
    assert table.loc[0, "seconds"] == "1.5" and table.loc[0, "guidance_scale"] == "7.0"


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.append(_row("a" * 16))
    manifest.close()
    with (tmp_path / "manifest.csv").open("a") as f:
        f.write("bbbbbbbbbbbbbbbb,ok,tiny")  # a kill mid-append
    reopened = Manifest(tmp_path)
    reopened.close()
    assert reopened.dropped_torn_line
    assert list(read_manifest(tmp_path)["job_id"]) == ["a" * 16]


def test_new_slot_widens_header_keeping_rows(tmp_path: Path) -> None:
    first = Manifest(tmp_path)
    first.append(_row("a" * 16))
    first.close()
    second = Manifest(tmp_path, slots=["mood"])
    second.append({**_row("b" * 16), "mood": "calm"})
    second.close()
    table = read_manifest(tmp_path)
    assert list(table["job_id"]) == ["a" * 16, "b" * 16]
    assert list(table["mood"]) == ["", "calm"]


def test_completed_needs_ok_row_and_matching_image(tmp_path: Path) -> None:
    atomic_write(tmp_path / "images" / "good.png", b"png-bytes")
    atomic_write(tmp_path / "images" / "bad.png", b"changed")
    good_sha = HashCache(None).file_sha256(tmp_path / "images" / "good.png")
    manifest = Manifest(tmp_path)
    manifest.append(_row("1" * 16, image="images/good.png", sha=good_sha))
    manifest.append(_row("2" * 16, image="images/bad.png", sha=good_sha))
    manifest.append(_row("3" * 16, image="images/gone.png", sha=good_sha))
    manifest.append(_row("4" * 16, status="failed"))
    manifest.close()
    assert completed_jobs(tmp_path) == {"1" * 16}


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write(tmp_path / "x" / "f.bin", b"abc")
    atomic_write(tmp_path / "x" / "f.bin", b"def")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.bin"]
    assert (tmp_path / "x" / "f.bin").read_bytes() == b"def"


def test_record_invocation_keeps_each_call(tmp_path: Path) -> None:
    first = record_invocation(tmp_path, {"sweep": {"name": "s"}}, ["+sweep=s"])
    second = record_invocation(tmp_path, {"sweep": {"name": "s"}}, ["+sweep=s", "sweep.seeds=1,2"])
    assert first != second
    assert (second / "overrides.yaml").read_text() == "- +sweep=s\n- sweep.seeds=1,2\n"


def test_hashes_ignore_names_and_use_cache(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "unet.bin").write_bytes(b"weights")
    (tmp_path / "a" / "model_index.json").write_text("{}")
    shutil.copytree(tmp_path / "a", tmp_path / "renamed")
    shutil.copy(tmp_path / "a" / "unet.bin", tmp_path / "other_name.bin")
    cache = HashCache(tmp_path / "hashes.json")
    assert cache.sha256(tmp_path / "a") == cache.sha256(tmp_path / "renamed")
    assert cache.sha256(tmp_path / "a" / "unet.bin") == cache.sha256(tmp_path / "other_name.bin")
    cache.save()
    reloaded = HashCache(tmp_path / "hashes.json")
    key = str((tmp_path / "other_name.bin").resolve())
    reloaded._entries[key][2] = "cached-value"  # proves the cache answers while size and mtime match
    assert reloaded.file_sha256(tmp_path / "other_name.bin") == "cached-value"


def test_progress_bar_on_tty_and_lines_in_ci() -> None:
    tty = io.StringIO()
    bar = Progress(4, stream=tty, tty=True)
    for ok in (True, True, False, True):
        bar.update(ok)
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n")
    assert "[########################] 4/4 images" in tty.getvalue() and "1 failed" in tty.getvalue()
    plain = io.StringIO()
    lines = Progress(100, stream=plain, tty=False)
    for _ in range(100):
        lines.update(True)
    printed = plain.getvalue().splitlines()
    # the first image, then every 10%
    assert [line.split(" images")[0] for line in printed] == [f"render: {n}/100" for n in (1, *range(10, 101, 10))]
    assert "\r" not in plain.getvalue()


def test_manifest_is_readable_by_pandas_as_text(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.append(_row("0123456789abcdef"))
    manifest.append(_row("0000000000001e10"))  # would turn into a float without dtype=str
    manifest.close()
    assert list(pd.read_csv(tmp_path / "manifest.csv", dtype=str)["job_id"]) == [
        "0123456789abcdef",
        "0000000000001e10",
    ]
