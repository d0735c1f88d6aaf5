"""How usage quantities read in answers: one rounding per kind of number.

GPU-seconds are given to the millisecond (the unit the Stripe meter counts), megapixels to the
pixel (six decimals), counts (jobs, images) and bytes as whole numbers. Quota counters are
float columns that repeated additions and subtractions leave with binary noise, such as
``3.9532000000000003`` or ``3.552713678800501e-15``; rounded here they read ``3.953`` and
``0.0``. Decimals are rounded exactly; a float is first read as the shortest decimal that
round-trips to it.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator

GPU_SECONDS_QUANTUM = Decimal("0.001")
MEGAPIXELS_QUANTUM = Decimal("0.000001")
# Limits counted in GPU-seconds; every other limit counts whole things (images, jobs, bytes,
# requests).
GPU_SECONDS_LIMITS = frozenset({"monthly_gpu_seconds"})

Number = float | int | Decimal


def exact(value: Number) -> Decimal:
    """``value`` as a decimal: a float as the shortest decimal that reads back as it."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    return Decimal(repr(float(value)))


def _rounded(value: Number, quantum: Decimal) -> float:
    # ``+ 0.0`` turns a negative zero (rounded noise below zero) into 0.0.
    return float(exact(value).quantize(quantum, ROUND_HALF_UP)) + 0.0


def gpu_seconds(value: Number) -> float:
    """GPU-seconds to the millisecond."""
    return _rounded(value, GPU_SECONDS_QUANTUM)


def megapixels(value: Number) -> float:
    """Megapixels to the pixel."""
    return _rounded(value, MEGAPIXELS_QUANTUM)


def whole(value: Number) -> int:
    """A count or a number of bytes."""
    return int(exact(value).quantize(Decimal(1), ROUND_HALF_UP))


def of_limit(name: str, value: Number) -> float | int:
    """A value of the limit ``name`` (its limit, used, reserved or remaining amount)."""
    return gpu_seconds(value) if name in GPU_SECONDS_LIMITS else whole(value)


def remaining(
    name: str, limit: Number | None, used: Number, reserved: Number
) -> float | int | None:
    """What is left of ``limit`` (None: unlimited), from the rounded amounts, never below 0."""
    if limit is None:
        return None
    left = exact(of_limit(name, limit)) - exact(of_limit(name, used))
    return of_limit(name, max(Decimal(0), left - exact(of_limit(name, reserved))))


def _optional_gpu_seconds(value: Number | None) -> float | None:
    return None if value is None else gpu_seconds(value)


def _optional_limits(values: object) -> object:
    if not isinstance(values, dict):
        return values
    return {
        name: of_limit(name, v)
        if isinstance(v, int | float | Decimal) and not isinstance(v, bool)
        else v
        for name, v in values.items()
    }


def show(value: float | int) -> str:
    """A rounded quantity in a sentence: ``3.953``, ``100000``, never ``1e+05``."""
    if isinstance(value, int):
        return str(value)
    return format(exact(value).normalize(), "f")


GpuSeconds = Annotated[float, BeforeValidator(gpu_seconds)]
Megapixels = Annotated[float, BeforeValidator(megapixels)]
OptionalGpuSeconds = Annotated[float | None, BeforeValidator(_optional_gpu_seconds)]
# Limit name → value dictionaries (a plan's effective limits, an organization's overrides).
LimitValues = Annotated[dict[str, Any], BeforeValidator(_optional_limits)]
