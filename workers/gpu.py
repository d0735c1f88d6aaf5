"""The GPU side of a worker process: the resident model behind a dynamic batcher, and the
optional learned segmenters.

Loaded once per process (after any fork) and shared by every job thread of the process.
Per-job accounting (the GPU meter) is the executors' (``workers.executors``): this module
imports none of them, the executors import it when a GPU operation runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hiddenmodel.settings import get_settings
from workers.batching import InpaintBatcher

if TYPE_CHECKING:
    from workers.pipelines.ghost.learned import CombinedSegmenter

log = logging.getLogger(__name__)

_lock = threading.Lock()
_batcher: InpaintBatcher | None = None
_segmenter_lock = threading.Lock()
_segmenter: CombinedSegmenter | None = None
_segmenter_loaded = False


def check_models(model_dir: Path | None = None) -> Path:
    """Fail at worker start, naming what is missing, rather than at the first job.

    Checks the SDXL checkpoint and any segmenter folder under it (a half-present one fails;
    an absent one means classical segmentation).
    """
    from workers.models import check_model_dir
    from workers.pipelines.ghost.learned import check_segmenter_dirs

    root = check_model_dir(model_dir or get_settings().model_dir)
    check_segmenter_dirs(root)
    return root


def inpainter() -> InpaintBatcher:
    """The process's batching inpainter over the resident model (loaded on first use)."""
    global _batcher
    with _lock:
        if _batcher is None:
            from workers.models import get_runtime

            settings = get_settings()
            _batcher = InpaintBatcher(
                get_runtime(settings.model_dir),
                max_batch=settings.gpu_batch_max_size,
                window=settings.gpu_batch_window_ms / 1000,
            )
        return _batcher


def segmenter() -> CombinedSegmenter | None:
    """The process's learned segmenter (loaded on first use), or ``None``: classical."""
    global _segmenter, _segmenter_loaded
    with _segmenter_lock:
        if not _segmenter_loaded:
            from workers.pipelines.ghost.learned import load_segmenter

            model_dir = get_settings().model_dir
            _segmenter = load_segmenter(model_dir) if model_dir is not None else None
            _segmenter_loaded = True
        return _segmenter


def load_models() -> None:
    """Load the resident model and the segmenters now (each once per process)."""
    started = time.perf_counter()
    inpainter()
    segmenter()
    log.info("models loaded in process %s in %.1f s", os.getpid(), time.perf_counter() - started)


def load_in_every_pool_process(concurrency: int, timeout: float) -> None:
    """For a prefork pool: every pool process loads the models as it starts (a model on a
    GPU cannot cross a fork), and the worker reports ``ready.`` only once all of them have,
    so nothing is received before a process can run it. A worker whose pool processes have
    not loaded within ``timeout`` exits instead of reporting ready."""
    from celery import signals

    from workers.celery_app import app

    loaded = multiprocessing.Value("i", 0)
    # Celery ends a pool process that has not started within this (4 s by default).
    app.conf.worker_proc_alive_timeout = timeout

    def load_here(**_: object) -> None:
        load_models()
        with loaded.get_lock():
            loaded.value += 1

    def wait_for_pool(**_: object) -> None:
        deadline = time.monotonic() + timeout
        while loaded.value < concurrency:
            if time.monotonic() > deadline:
                log.critical(
                    "%s of %s pool processes loaded the models within %s s; exiting",
                    loaded.value,
                    concurrency,
                    timeout,
                )
                os._exit(3)
            time.sleep(0.05)

    signals.worker_process_init.connect(load_here, weak=False)
    signals.worker_ready.connect(wait_for_pool, weak=False)


def _forget_segmenter_in_child() -> None:
    global _segmenter, _segmenter_loaded, _segmenter_lock
    # Models on a GPU cannot cross a fork: a forked child loads its own.
    _segmenter, _segmenter_loaded = None, False
    _segmenter_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_segmenter_in_child)
