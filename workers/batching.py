"""Dynamic batching of inpainting requests in front of one resident model.

Job threads call :meth:`InpaintBatcher.inpaint` and block; one GPU thread gathers requests
that can share a pipeline call (same steps, strength and guidance), up to ``max_batch``
within ``window`` seconds of the first, pads them to a common size (padding is kept, not
generated: its mask is 0) and runs them together. Each job gets its own result, its share of
the device time, and may cancel without stopping the others.

Jobs that run in the process announce themselves with :meth:`InpaintBatcher.job`. The window
is then only waited while some announced job could still send a request: a lone job, or the
last of a burst, runs at once instead of waiting for company that cannot come. Callers that
announce nothing (no job is known) get the whole window, as before.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from workers.pipelines.contracts import (
    Inpainter,
    InpaintRequest,
    InpaintResult,
    JobCancelled,
    ProgressCallback,
)

log = logging.getLogger(__name__)

# A request joins a batch only if padding costs at most this much extra area.
MAX_PAD_RATIO = 1.5


@dataclass
class _Item:
    request: InpaintRequest
    progress: ProgressCallback | None
    future: Future[InpaintResult] = field(default_factory=Future)
    canceled: bool = False

    @property
    def key(self) -> tuple[int, float, float]:
        r = self.request
        return (r.steps, r.strength, r.guidance)

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.request.image.size
        return int(w), int(h)


def _fits(items: list[_Item], candidate: _Item) -> bool:
    width = max(i.size[0] for i in [*items, candidate])
    height = max(i.size[1] for i in [*items, candidate])
    return all(width * height <= MAX_PAD_RATIO * i.size[0] * i.size[1] for i in [*items, candidate])


def _pad(request: InpaintRequest, width: int, height: int) -> InpaintRequest:
    if request.image.size == (width, height):
        return request
    image = Image.new("RGB", (width, height))
    image.paste(request.image, (0, 0))
    w, h = request.image.size
    # Repeat the edge so the model sees no hard border; the mask keeps it out of generation.
    if width > w:
        image.paste(request.image.crop((w - 1, 0, w, h)).resize((width - w, h)), (w, 0))
    if height > h:
        image.paste(image.crop((0, h - 1, width, h)).resize((width, height - h)), (0, h))
    mask = Image.new("L", (width, height), 0)
    mask.paste(request.mask, (0, 0))
    return InpaintRequest(
        image=image,
        mask=mask,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed,
        steps=request.steps,
        strength=request.strength,
        guidance=request.guidance,
    )


class InpaintBatcher:
    """An :class:`Inpainter` that batches concurrent callers onto one model thread."""

    def __init__(self, model: Inpainter, max_batch: int = 4, window: float = 0.05) -> None:
        self.model = model
        self.max_batch = max_batch
        self.window = window
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._pending: list[_Item] = []
        # Jobs in the process that may still send a request (see job()).
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="inpaint-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Around a job that may send requests: while it runs, a batch waits for it."""
        with self._jobs_lock:
            self._jobs += 1
        try:
            yield
        finally:
            with self._jobs_lock:
                self._jobs -= 1

    def _company_possible(self, waiting: int) -> bool:
        """Whether another request may still join: no job is known (callers that announce
        nothing), or some announced job has no request waiting yet."""
        with self._jobs_lock:
            jobs = self._jobs
        return jobs == 0 or jobs > waiting

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        item = _Item(request, progress)
        self._queue.put(item)
        return item.future.result()

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]:
        items = [_Item(r, progress) for r in requests]
        for item in items:
            self._queue.put(item)
        return [item.future.result() for item in items]

    def _next(self, timeout: float | None) -> _Item | None:
        if self._pending:
            return self._pending.pop(0)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self) -> list[_Item]:
        first = self._next(None)
        assert first is not None
        batch = [first]
        deadline = time.monotonic() + self.window
        skipped: list[_Item] = []
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            nothing_waits = self._queue.empty() and not self._pending
            if nothing_waits and (
                remaining <= 0 or not self._company_possible(len(batch) + len(skipped))
            ):
                break
            item = self._next(max(0.0, remaining))
            if item is None:
                break
            if item.key == first.key and _fits(batch, item):
                batch.append(item)
            else:
                skipped.append(item)
        # Incompatible requests wait for the next batch, in arrival order.
        self._pending = skipped + self._pending
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            try:
                self._run(batch)
            except BaseException as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _run(self, batch: list[_Item]) -> None:
        width = max(i.size[0] for i in batch)
        height = max(i.size[1] for i in batch)
        padded = [_pad(i.request, width, height) for i in batch]

        def progress(step: int, total: int) -> None:
            live = [i for i in batch if not i.canceled]
            for item in live:
                if item.progress is None:
                    continue
                try:
                    item.progress(step, total)
                except JobCancelled as exc:
                    item.canceled = True
                    item.future.set_exception(exc)
            if all(i.canceled for i in batch):
                raise JobCancelled()

        try:
            results = self.model.inpaint_batch(padded, progress)
        except JobCancelled:
            return
        log.info("inpainted a batch of %d at %dx%d", len(batch), width, height)
        for item, result in zip(batch, results, strict=True):
            if item.canceled:
                continue
            w, h = item.size
            image = result.image if result.image.size == (w, h) else result.image.crop((0, 0, w, h))
            item.future.set_result(
                InpaintResult(image=image, gpu_seconds=result.gpu_seconds, batch_size=len(batch))
            )
