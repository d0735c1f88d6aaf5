"""The OpenAPI document is a usable contract: a client generated from it by
openapi-python-client registers, creates an organization and an API key, runs a job end to end
against the API served as its own process with a CPU worker, and downloads the output."""

from __future__ import annotations

import importlib
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import PASSWORD, unique

PACKAGE = "hm_generated_client"


@pytest.fixture(scope="module")
def live_api(cluster: Any) -> Iterator[str]:
    """The API as its own process on a loopback port; the cluster runs the jobs."""
    from tests.conftest import _free_port
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel("api-generated-client", "api", "--port", str(port), "--workers", "1")
    try:
        wait_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def generated(live_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package, generated from the live API's document into a temporary folder."""
    generator = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client"
    )
    if not Path(generator).exists():
        pytest.fail("openapi-python-client is missing: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("client")
    spec = root / "openapi.json"
    spec.write_text(json.dumps(httpx.get(f"{live_api}/openapi.json", timeout=10).json()))
    out = root / PACKAGE
    # Archives are bytes to a client: the generator knows binary bodies as octet-stream.
    config = root / "config.json"
    config.write_text(
        json.dumps({"content_type_overrides": {"application/zip": "application/octet-stream"}})
    )
    result = subprocess.run(
        [
            generator,
            "generate",
            "--path",
            str(spec),
            "--output-path",
            str(out),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The generator reports what it could not translate as warnings; there must be none.
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def _photo() -> bytes:
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generated_client_runs_a_job_end_to_end(
    services: Any, live_api: str, generated: ModuleType
) -> None:
    client_mod = _module("client")
    models = _module("models")
    types = _module("types")
    auth = {n: _module(f"api.auth.{n}") for n in ("register_register", "auth_bearer_login")}
    create_org = _module("api.organizations.create_organization")
    create_key = _module("api.api_keys.create_api_key")
    submit_job = _module("api.jobs.submit_job")
    get_job = _module("api.jobs.get_job")
    download = _module("api.jobs.download_job_output")

    anonymous = client_mod.Client(base_url=live_api, raise_on_unexpected_status=True)
    email = f"{unique('gen')}@example.com"
    user = auth["register_register"].sync(
        client=anonymous, body=models.UserCreate(email=email, password=PASSWORD)
    )
    assert isinstance(user, models.UserRead), user
    login = auth["auth_bearer_login"].sync(
        client=anonymous, body=models.BodyAuthBearerLogin(username=email, password=PASSWORD)
    )
    assert isinstance(login, models.BearerResponse), login

    session = client_mod.AuthenticatedClient(
        base_url=live_api, token=login.access_token, raise_on_unexpected_status=True
    )
    slug = unique("gen")
    org = create_org.sync(client=session, body=models.OrganizationCreate(slug=slug, name="Gen"))
    assert isinstance(org, models.OrganizationRead), org
    key = create_key.sync(
        org_id=org.id,
        client=session,
        body=models.ApiKeyCreate(
            name="generated", scopes=[models.Scope("jobs:write"), models.Scope("jobs:read")]
        ),
    )
    assert isinstance(key, models.ApiKeyCreated), key

    api = client_mod.AuthenticatedClient(
        base_url=live_api, token=key.key, raise_on_unexpected_status=True
    )
    # A problem+json answer parses into the generated 4XX model.
    refused = get_job.sync_detailed(job_id=key.id, client=api)
    assert refused.status_code == 404
    assert refused.parsed.status == 404

    upload = types.File(payload=io.BytesIO(_photo()), file_name="photo.png", mime_type="image/png")
    body = models.BodySubmitJob(image=upload, operation="resize", params=json.dumps({"width": 48}))
    submitted = submit_job.sync_detailed(client=api, body=body)
    assert submitted.status_code == 202, submitted.content
    job = submitted.parsed
    assert isinstance(job, models.JobRead), job

    deadline = time.monotonic() + 60
    while job.status.value in ("queued", "running"):
        assert time.monotonic() < deadline, f"job still {job.status.value}"
        time.sleep(0.2)
        job = get_job.sync(job_id=job.id, client=api)
        assert isinstance(job, models.JobRead), job
    assert job.status.value == "succeeded", job.to_dict()
    assert [o.name for o in job.outputs], job.to_dict()
    name = job.outputs[0].name

    redirect = download.sync_detailed(job_id=job.id, name=name, client=api)
    assert redirect.status_code == 307
    location = redirect.headers["location"]
    output = httpx.get(location, timeout=10)
    assert output.status_code == 200, output.text
    with Image.open(io.BytesIO(output.content)) as result:
        assert result.size == (48, 32)

    missing = download.sync_detailed(job_id=job.id, name="nope", client=api)
    assert missing.status_code == 404
    assert missing.parsed.type_.endswith("/output-not-found")
