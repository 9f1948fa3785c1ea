"""The body of a local worker process: render the units the parent sends, report each finished row."""

from __future__ import annotations

import signal
import traceback
from typing import Any

# What a held pool (executors/local.py) sends a worker instead of None when a run has no more work for it.
HOLD = "hold"


def worker_main(wid: int, slot, inbox, outbox) -> None:
    """The first message on `inbox` is the run's WorkerSetup (None: not needed after all); the process may be
    started before it is known, and imports its libraries meanwhile. Then units, until None (exit) or, from a held
    pool, HOLD: report every row, then wait for the next run's WorkerSetup, keeping the renderer and its model."""
    # Ctrl-C reaches the whole process group; only the parent decides what happens to the run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from batchgen.library_log import LOG, route, settle

        unroute = route(None)  # the libraries' import-time notices: no run directory is known yet
        settle()
        import torch

        import batchgen.engine.worker  # noqa: F401  (imported while the parent plans; setup.renderer builds one)
        from batchgen.engine.writer import ImageWriter

        warm_up_pipelines()
        setup = inbox.get()
        unroute()
        if setup is None:
            return
        route(setup.run_dir / LOG)  # for this process's life
        if slot.threads:
            torch.set_num_threads(slot.threads)
        renderer = setup.renderer(slot.device, slot.name)
        while setup is not None:
            renderer.update_models(setup.models)  # a held worker's next run: its own models, new LoRA files
            writer = ImageWriter(setup.run_dir, setup.models, lambda row: outbox.put(("row", wid, row)))
            outbox.put(("idle", wid))  # up: ready for a unit
            while isinstance(unit := inbox.get(), list):
                rows: dict[str, dict[str, Any]] = {job.job_id: row for job, row in unit}
                for result in renderer.render([job for job, _ in unit]):
                    writer.submit(rows[result.job_id], result)
                outbox.put(("idle", wid))  # the writer may still be finishing this unit's PNGs
            writer.close()
            # Every row is on the queue: the parent goes on now rather than wait a second for torch's teardown.
            outbox.put(("done", wid))
            setup = inbox.get() if unit == HOLD else None
    except OSError as e:
        from batchgen.errors import OUTPUT_ERRNOS

        if e.errno not in OUTPUT_ERRNOS:
            outbox.put(("crash", wid, f"worker {slot.name} crashed: {type(e).__name__}: {e}"))
            raise
        outbox.put(("output", wid, e.errno, e.strerror, e.filename))  # the parent stops the run
    except Exception as e:  # reported as failed rows by the parent, which then replaces this worker
        outbox.put(("crash", wid, f"worker {slot.name} crashed: {type(e).__name__}: {e}"))
        traceback.print_exc()


def warm_up_pipelines() -> None:
    """Import the pipeline classes every base uses (their modules are most of diffusers' import time)."""
    import diffusers

    from batchgen.assets.bases import BASES

    for base in BASES:
        getattr(diffusers, base.pipeline_class)
