"""Debian's chromium for the browser tests (Playwright drives it; nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing (scripts/lib.sh ensure_chromium installs it)")
    pytest.skip(f"no {CHROMIUM}: install it with `apt-get install -y chromium`")
