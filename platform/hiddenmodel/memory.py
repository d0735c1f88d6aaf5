"""glibc's malloc thresholds for the processes that hold whole images.

By default glibc serves an allocation over 128 KiB with its own ``mmap`` and gives memory at
the top of its heap back to the kernel once 128 KiB of it is free (both limits rise a little,
on their own, as the process frees large blocks). A process that decodes, inflates, resamples
and encodes megabyte-sized buffers for every job then maps fresh pages for most of them, and
the kernel zeroes each page on its first touch: on a 1024x1024 photo resized to 512 px that
was about 3,000 page faults per job in a worker pool process, and 4 ms of its 45 ms of CPU.

:func:`tune_malloc` raises both limits once, at start-up, so such buffers are reused from the
heap: a block under :data:`MMAP_THRESHOLD` comes from the heap, and the heap keeps up to
:data:`TRIM_THRESHOLD` free at its top. The price is memory held: a process's resident size
stays near its high-water mark plus at most that much, instead of shrinking between jobs.
Blocks over :data:`MMAP_THRESHOLD` (a 40-megapixel image's pixels) are still mapped and
unmapped one by one.

The same limits are put in the environment as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``, which glibc reads as a process starts, so the processes this one
starts (a Celery pool's children are forked and keep the limits anyway; uvicorn's workers are
spawned) have them too. Anyone who sets either, or ``GLIBC_TUNABLES``, keeps their own choice;
``HM_MALLOC_TUNING=0`` keeps glibc's defaults. Elsewhere than glibc (musl, macOS) nothing is
changed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Final

MMAP_THRESHOLD: Final = 64 * 1024 * 1024
TRIM_THRESHOLD: Final = 128 * 1024 * 1024
# mallopt's parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_OWN_CHOICE: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the processes it forks
    from now on); whether they were changed."""
    if os.environ.get("HM_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in _OWN_CHOICE) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # glibc's own name for its version: absent from musl, whose mallopt does nothing.
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    return True
