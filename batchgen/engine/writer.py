"""PNG encoding, hashing and disk writes off the render thread; finished rows go to a sink.

A bounded queue keeps memory flat: the render loop only waits when the writer is that far behind. The sink is the
manifest in a single-process run, and the queue to the parent process in a worker: an image is on disk, fsynced,
before its row is recorded anywhere.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from batchgen.cells import format_timings
from batchgen.columns import png_job
from batchgen.engine.png import a1111_parameters, encode_png
from batchgen.manifest import atomic_write
from batchgen.metrics import degenerate, measure, read_rgb
from batchgen.spec import ModelSpec, RenderResult

_STOP = object()


class ImageWriter:
    def __init__(
        self,
        run_dir: Path,
        models: dict[str, ModelSpec],
        sink: Callable[[dict[str, Any]], None],
        maxsize: int = 16,
    ) -> None:
        self.run_dir = run_dir
        self.models = models
        self.sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="batchgen-writer", daemon=True)
        self._thread.start()

    def submit(self, row: dict[str, Any], result: RenderResult) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((row, result))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue  # drain without writing: the run is already failing
            try:
                self._write(*item)
            except BaseException as e:  # surfaced to the render thread on its next submit or at close
                self._error = e

    def _write(self, row: dict[str, Any], result: RenderResult) -> None:
        self.sink(finish_row(self.run_dir, self.models, row, result))


def finish_row(run_dir: Path, models: dict[str, ModelSpec], row: dict[str, Any], result: RenderResult) -> dict:
    """Write the job's PNG (atomically) and return its completed manifest row."""
    row, data = encode_row(models, row, result, run_dir)
    return store_row(run_dir, row, data)


def encode_row(
    models: dict[str, ModelSpec], row: dict[str, Any], result: RenderResult, run_dir: Path | None = None
) -> tuple[dict, bytes | None]:
    """The completed row (all but the write time) and the PNG bytes, or None for a failed job.

    With `run_dir`, a LoRA job whose reference image is already there gets its effect and ssim now (references
    render first on each worker); the others are filled once the run ends (report.effects)."""
    job = png_job(row)
    row = dict(row)
    row["worker"] = result.worker
    row["dtype"] = result.dtype
    data = None
    if result.image is None:
        row["status"] = "failed"
        row["error"] = result.error
        row["degenerate"] = result.degenerate
    else:
        mark = time.perf_counter()
        row["status"] = "ok"
        row["error"] = ""
        row["image"] = f"images/{row['job_id']}.png"
        data = encode_png(result.image, a1111_parameters(row, models[row["model"]]), job)
        row["image_sha256"] = hashlib.sha256(data).hexdigest()
        row.update(measure_against_reference(result.image, row, run_dir))
        result.timings["write"] = time.perf_counter() - mark
    row["timings"] = dict(result.timings)
    row["seconds"] = result.seconds
    return row, data


def measure_against_reference(image: Any, row: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    out: dict[str, Any] = {"degenerate": degenerate(pixels)}
    if run_dir is None or not row.get("reference"):
        return out
    # Content-addressed and written atomically: if the file is there, it is the reference's finished image.
    reference = run_dir / "images" / f"{row['reference']}.png"
    if reference.is_file():
        measured = measure(pixels, read_rgb(reference))
        out |= {"effect": measured.effect, "ssim": measured.ssim}
    return out


def store_row(run_dir: Path, row: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """Write the PNG where the row says, fsynced, then seal the row's timing fields."""
    row = dict(row)
    timings: dict[str, float] = row.pop("timings")
    if data is not None:
        mark = time.perf_counter()
        atomic_write(run_dir / row["image"], data)
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - mark
    row["seconds"] = round(sum(timings.values()) or row["seconds"], 4)
    row["timings"] = format_timings(timings)
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row
