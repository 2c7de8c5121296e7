"""The deployment kit: what can be checked without a container engine or a cluster.

Rendered by ``kubectl kustomize`` and validated with ``kubernetes-validate`` (the
Kubernetes API's own schemas); the KEDA ScaledObject (a CRD, not in those schemas)
against the fields we use; the compose file against the Compose Specification's JSON
schema; the Dockerfile read statically; and each against the code: every variable
set is one the code reads, every probe an endpoint that exists.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.binaries import require_binary

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/example", "overlays/example-keda"]
KUBERNETES_VERSION = "1.32.0"
SOURCE_FOLDERS = ("outbox", "dispatcher", "api", "demo")
PROBE_PATHS = {"/livez", "/readyz", "/health"}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"const": "outbox-dispatcher"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "prometheus"},
                            "metadata": {
                                "type": "object",
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {
                                    "query": {"type": "string", "pattern": "outbox_queue_depth"},
                                    "threshold": {"type": "string", "pattern": "^[0-9]+$"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def rendered(overlay: str) -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl", "rendering the Kubernetes manifests: install kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def variables_the_code_reads() -> set[str]:
    names: set[str] = set()
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"OUTBOX_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    return names


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return list(pod.get("containers", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_passes_the_kubernetes_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"} <= set(kinds)
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    [deployment] = [
        d
        for d in rendered("base")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "outbox-dispatcher"
    ]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_pods_run_as_non_root_read_only_without_capabilities_and_probe_real_endpoints() -> None:
    docs = rendered("overlays/example")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(workloads) == 3
    for doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["image"] == "registry.example.com/trading/outbox:0.1.0"
            for probe in ("livenessProbe", "readinessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["path"] in PROBE_PATHS
    dispatcher = next(
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "outbox-dispatcher"
    )
    probes = dispatcher["spec"]["template"]["spec"]["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert dispatcher["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10


def test_manifests_set_only_variables_the_code_reads_and_no_secret_values() -> None:
    known = variables_the_code_reads()
    secret_names = ("SECRET", "PASSWORD", "TOKEN", "PRIVATE_KEY", "DATABASE_URL")
    for doc in rendered("overlays/example"):
        if doc["kind"] == "ConfigMap":
            assert set(doc["data"]) <= known, set(doc["data"]) - known
            assert not [k for k in doc["data"] if any(s in k for s in secret_names)]
        for container in containers(doc):
            for env in container.get("env", []):
                assert env["name"] in known, env["name"]
                if any(s in env["name"] for s in secret_names):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]
    assert not [d for d in rendered("overlays/example") if d["kind"] == "Secret"]


def test_the_compose_file_passes_the_compose_specification_schema() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    validator = jsonschema.Draft201909Validator(schema)  # its $schema, without the lookup
    errors = sorted(validator.iter_errors(compose), key=str)
    assert errors == [], errors[0].message
    broken = {**compose, "services": {"x": {"depends_on": {"y": {"condition": "whenever"}}}}}
    assert list(validator.iter_errors(broken)), "the schema must be able to refuse"


def test_compose_starts_after_the_migration_and_sets_only_known_variables() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    known = variables_the_code_reads()
    for name in ("dispatcher-1", "dispatcher-2", "api"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert set(services[name]["environment"]) - {"OUTBOX_DISPATCHER_ID"} <= known
    assert services["migrate"]["command"] == ["migrate"]
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        assert (ROOT / "deploy" / source).resolve().exists(), source


def test_the_dockerfile_is_multi_stage_non_root_and_carries_no_secrets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    stages = [rest for word, *rest in instructions if word == "FROM"]
    assert len(stages) >= 2
    users = [rest[0] for word, *rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert not re.search(r"^ADD\s+https?://", text, re.MULTILINE)
    env_lines = re.findall(r"^ENV[^\n]*(?:\\\n[^\n]*)*", text, re.MULTILINE)
    assert env_lines and not re.search(r"SECRET|PASSWORD|TOKEN|PRIVATE", " ".join(env_lines))
    assert 'ENTRYPOINT ["outbox"]' in text
    assert (ROOT / ".dockerignore").read_text().count(".git") >= 1
