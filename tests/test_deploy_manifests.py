"""The Kubernetes manifests (docker/k8s) and the compose file: they render, they validate
against the Kubernetes and KEDA schemas, they carry every HM_ setting the code reads, and the
workers' grace periods follow the operations' time limits."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hiddenmodel.settings import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
DATA = Path(__file__).resolve().parent / "data"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSION = "1.32.0"
# What a worker needs after its hard limit: store the outputs and commit the finish.
FINISH_MARGIN_S = 60
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def _render(target: Path) -> list[dict[str, Any]]:
    """`kustomize build`, by the standalone binary or kubectl's built-in one."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(target)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(target)]
    else:
        pytest.fail("neither kustomize nor kubectl is installed: docs/DEPLOY.md, 'Checks'")
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / request.param)


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _setting_names() -> set[str]:
    return {f"HM_{name.upper()}" for name in Settings.model_fields}


def _annotated(doc: dict[str, Any], key: str) -> set[str]:
    value = doc["metadata"].get("annotations", {}).get(key, "")
    return {v.strip() for v in value.split(",") if v.strip()}


def test_every_object_validates_against_the_kubernetes_schema(
    rendered: list[dict[str, Any]],
) -> None:
    errors = []
    for doc in rendered:
        if doc["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_catches_a_mistake() -> None:
    doc = _named(_render(K8S / "base"), "Deployment", "hm-api")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _keda_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(
        {**schema[doc["kind"]], "definitions": schema["definitions"]}
    )
    errors = [f"{doc['metadata']['name']}: {e.message}" for e in validator.iter_errors(doc["spec"])]
    for trigger in doc["spec"].get("triggers", []):
        rules = schema["scalerMetadata"].get(trigger["type"])
        if rules is None:
            errors.append(f"{doc['metadata']['name']}: no rules for scaler {trigger['type']}")
            continue
        keys = set(trigger.get("metadata", {}))
        errors += [f"unknown {trigger['type']} key {k}" for k in keys - set(rules["allowed"])]
        errors += [f"missing {trigger['type']} key {k}" for k in set(rules["required"]) - keys]
    return errors


def test_keda_objects_use_only_the_crd_fields(rendered: list[dict[str, Any]]) -> None:
    schema = json.loads((DATA / "keda_v2.schema.json").read_text())
    keda = [d for d in rendered if d["kind"] in KEDA_KINDS]
    assert all(d["apiVersion"] == "keda.sh/v1alpha1" for d in keda)
    errors = [e for doc in keda for e in _keda_errors(doc, schema)]
    assert not errors, "\n".join(errors)
    broken = _named(rendered, "ScaledObject", "hm-worker-gpu")
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # not a string
    assert _keda_errors(broken, schema)


def test_each_worker_queue_scales_on_its_redis_list_and_on_jobs_in_flight(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = {d["metadata"]["name"] for d in rendered if d["kind"] == "Deployment"}
    queues = {"hm-worker-gpu": "gpu", "hm-worker-cpu": "cpu", "hm-worker-background": "webhooks"}
    for name, queue in queues.items():
        scaled = _named(rendered, "ScaledObject", name)["spec"]
        assert scaled["scaleTargetRef"]["name"] in deployments
        by_type = {t["type"]: t["metadata"] for t in scaled["triggers"]}
        assert by_type["redis"]["listName"] == queue
        assert f'queue="{queue}"' in by_type["prometheus"]["query"]
        assert "running" in by_type["prometheus"]["query"]
        # KEDA owns the count: a replicas field in the Deployment would fight it on apply.
        assert "replicas" not in _named(rendered, "Deployment", name)["spec"]
    gpu = _named(rendered, "ScaledObject", "hm-worker-gpu")["spec"]
    assert gpu["minReplicaCount"] == 0
    # The chosen cooldown (docs/DEPLOY.md), also the HPA's scale-down window.
    assert gpu["cooldownPeriod"] >= 300
    window = gpu["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert window["stabilizationWindowSeconds"] == gpu["cooldownPeriod"]


def test_every_setting_the_code_reads_is_in_the_config_map_or_a_secret(
    rendered: list[dict[str, Any]],
) -> None:
    provided: set[str] = set()
    for doc in rendered:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("hm-config"):
            provided |= set(doc.get("data", {}))
            provided |= _annotated(doc, "hiddenmodel.dev/unset-settings")
        if doc["kind"] == "Secret":
            provided |= set(doc.get("stringData", {})) | set(doc.get("data", {}))
            provided |= _annotated(doc, "hiddenmodel.dev/optional-settings")
    missing = sorted(_setting_names() - provided)
    assert not missing, (
        f"settings missing from docker/k8s/base (configmap.yaml, secret.yaml): {missing}"
    )
    unknown = sorted(n for n in provided if n.startswith("HM_") and n not in _setting_names())
    assert not unknown, f"docker/k8s names settings the code does not read: {unknown}"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    return doc


def test_every_setting_the_code_reads_is_in_the_compose_file() -> None:
    doc = _compose()
    provided = set(doc["x-hm-env"])
    for service in doc["services"].values():
        env = service.get("environment") or {}
        provided |= set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
    missing = sorted(_setting_names() - provided)
    assert not missing, f"settings missing from docker/compose.yaml (x-hm-env): {missing}"


def test_the_compose_file_follows_the_compose_specification() -> None:
    # tests/data/compose_spec.json: the specification's schema as Debian's docker-compose
    # 1.29.2 ships it (Apache-2.0). It predates the top-level `name` (added to the
    # specification in 2022), which is checked here by hand.
    doc = _compose()
    assert isinstance(doc.pop("name"), str)
    schema = json.loads((DATA / "compose_spec.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors
    doc["services"]["api"]["restart_policy"] = "always"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc))


def _grace_for(queues: set[str], config: dict[str, str]) -> int:
    limits = [
        float(config["HM_GPU_HARD_LIMIT_SECONDS"])
        if queue == "gpu"
        else float(config["HM_CPU_HARD_LIMIT_SECONDS"])
        for queue in queues
    ]
    return math.ceil(max(limits)) + FINISH_MARGIN_S


def test_worker_grace_periods_cover_the_longest_job_of_their_queues(
    rendered: list[dict[str, Any]],
) -> None:
    config = _named(rendered, "ConfigMap", "hm-config")["data"]
    workers = [
        d for d in rendered if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]
    ]
    assert len(workers) == 3
    for worker in workers:
        pod = worker["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        queues = set(args[args.index("--queues") + 1].split(","))
        assert pod["terminationGracePeriodSeconds"] == _grace_for(queues, config), worker[
            "metadata"
        ]["name"]
    # The compose file's stop_grace_period follows the code's defaults the same way.
    defaults = Settings()
    services = _compose()["services"]
    assert services["worker"]["stop_grace_period"] == (
        f"{(math.ceil(defaults.gpu_hard_limit_seconds) + FINISH_MARGIN_S) // 60}m"
    )
    assert services["worker-cpu"]["stop_grace_period"] == (
        f"{(math.ceil(defaults.cpu_hard_limit_seconds) + FINISH_MARGIN_S) // 60}m"
    )
    assert config["HM_GPU_HARD_LIMIT_SECONDS"] == f"{defaults.gpu_hard_limit_seconds:g}"


def test_pods_run_unprivileged_with_limits_and_only_the_api_is_reachable(
    rendered: list[dict[str, Any]],
) -> None:
    for doc in rendered:
        if doc["kind"] not in {"Deployment", "Job"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    gpu = _named(rendered, "Deployment", "hm-worker-gpu")["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    deny = next(p for p in policies if p["spec"]["podSelector"] == {})
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    opened = [p["spec"]["podSelector"]["matchLabels"] for p in policies if p is not deny]
    assert opened == [{"app.kubernetes.io/component": "api"}]
    dispatcher = _named(rendered, "Deployment", "hm-dispatcher")["spec"]
    assert dispatcher["replicas"] == 1 and dispatcher["strategy"]["type"] == "Recreate"
    api = _named(rendered, "Deployment", "hm-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = _named(rendered, "HorizontalPodAutoscaler", "hm-api")["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
