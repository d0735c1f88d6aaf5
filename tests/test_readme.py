"""The README's walkthroughs, run as they stand against a live ``hiddenmodel up``.

The shell blocks marked ``<!-- runnable -->`` are joined, in order, into one bash script run
with ``set -euo pipefail``: any step that fails (a refused call whose answer lacks the field
read from it, a file that is not there) fails the test, so the README cannot drift from what
the platform does. The script is run twice against the same ``up``: the walkthrough must be
re-runnable, and it must write nothing into the checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PG
from tests.services import REPO
from tests.up_harness import UP_DB, Up, drop_database, free_port, stopped_cleanly

README = REPO / "README.md"
MARK = "<!-- runnable -->"
BLOCK = re.compile(rf"^{re.escape(MARK)}\n```bash\n(.*?)^```$", re.M | re.S)
WALKTHROUGH_TIMEOUT_S = 420
README_DB = f"{UP_DB}_readme"


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in BLOCK.finditer(text)]


def test_every_marked_block_is_found() -> None:
    text = README.read_text()
    blocks = runnable_blocks(text)
    assert len(blocks) == text.count(MARK), "a runnable mark not directly above a bash block"
    assert len(blocks) >= 25
    script = "\n".join(blocks)
    # Every file a runnable block sends is one an earlier block wrote.
    for sent in sorted(set(re.findall(r"=@([\w.-]+)", script))):
        assert re.search(rf"(cp .* {re.escape(sent)}\b|-o {re.escape(sent)}\b)", script), sent


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"
    executable = Path(sys.executable).with_name("hiddenmodel")
    subprocess.run([str(executable), "make-tiny-model", str(path)], check=True, timeout=120)
    return path


def _untracked() -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


def test_the_walkthroughs_run_as_written(s3: None, readme_model: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(runnable_blocks(README.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in {"HM_EMBEDDED", "HM_PUBLIC_BASE_URL"}}
    drop_database(README_DB)
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        env[var] = f"postgresql+psycopg://{role}:{role}@{PG}/{README_DB}"
    env["HM_MODEL_DIR"] = str(readme_model)
    env["PYTHONUNBUFFERED"] = "1"
    # The walkthrough runs where up runs: in development, where a loopback receiver is allowed.
    env["HM_ENVIRONMENT"] = "development"
    env.pop("HM_WEBHOOK_ALLOW_PRIVATE_URLS", None)
    before = _untracked()
    with tempfile.TemporaryDirectory(prefix="hm-readme-") as tmp:
        data_dir = Path(tmp) / "var"
        env["HM_DATA_DIR"] = str(data_dir)
        up = Up(env, cwd=REPO)
        try:
            up.wait_for_key()
            shell_env = {
                **env,
                "API": up.base,
                "HM": str(Path(sys.executable).with_name("hiddenmodel")),
                "HOOK_PORT": str(free_port()),
            }
            for run in (1, 2):
                result = subprocess.run(
                    ["bash", "-c", script],
                    cwd=REPO,
                    env=shell_env,
                    capture_output=True,
                    text=True,
                    timeout=WALKTHROUGH_TIMEOUT_S,
                )
                output = result.stdout[-6000:] + "\n--- stderr ---\n" + result.stderr[-4000:]
                assert result.returncode == 0, f"run {run}:\n{output}\n--- up ---\n{up.output}"
                assert '"type":"webhook.test"' in result.stdout, output
                assert '"type":"job.succeeded"' in result.stdout, output
                assert "needs_review:" in result.stdout, output
        finally:
            stopped_cleanly(up)
            drop_database(README_DB)
    written = set(re.findall(r"(?:-o|cp \S+) ([\w.-]+)", script))
    assert {"photo.png", "garment.png", "resized.png"} <= written, written
    new = {Path(path).name for path in _untracked() - before}
    assert not new & written, f"the walkthrough wrote into the checkout: {new & written}"
