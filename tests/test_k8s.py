"""The KubeRay manifests (infra/k8s) as the cluster would check them: against KubeRay's CRD schema (the v1.7.0 CRD
files `ray.io_rayjobs.yaml.gz` and `ray.io_rayclusters.yaml.gz`, Apache-2.0, from ray-project/kuberay
ray-operator/config/crd/bases; this project does not ship them: they are read from $CLIPFORGE_KUBERAY_CRDS or the
workplace's ../shared/kuberay, and those tests are skipped, saying so, when neither holds them), their pod
templates against the core Kubernetes schemas (`kubernetes-validate`, strict: an unknown field fails), and the
RayJob's entrypoint as a clipforge command that click accepts (parsed, not run). Fast: no cluster, no network."""

from __future__ import annotations

import functools
import gzip
import os
import shlex
from pathlib import Path

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("CLIPFORGE_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay")
MANIFESTS = {"RayJob": ROOT / "infra/k8s/rayjob.yaml", "RayCluster": ROOT / "infra/k8s/raycluster.yaml"}
CRDS = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCluster": "ray.io_rayclusters.yaml.gz"}


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """OpenAPI v3 schemas are JSON Schema draft 7 plus `x-kubernetes-*` annotations, which validators ignore."""
    return jsonschema.Draft7Validator(crd_schema(kind))


def crd_schema(kind: str) -> dict:
    if not (FIXTURES / CRDS[kind]).exists():
        pytest.skip(f"KubeRay's CRD file {CRDS[kind]} is not in {FIXTURES} (set CLIPFORGE_KUBERAY_CRDS)")
    with gzip.open(FIXTURES / CRDS[kind], "rt") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB of YAML: libyaml if present
    assert crd["spec"]["names"]["kind"] == kind
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_templates(manifest: dict) -> list[dict]:
    spec = cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_matches_the_kuberay_crd(kind: str) -> None:
    manifest = yaml.safe_load(MANIFESTS[kind].read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    crd_validator(kind).validate(manifest)


def test_the_crd_schema_refuses_a_wrong_manifest() -> None:
    manifest = yaml.safe_load(MANIFESTS["RayJob"].read_text())
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        crd_validator("RayJob").validate(manifest)


@pytest.mark.parametrize("kind", MANIFESTS)
def test_pod_templates_match_the_core_kubernetes_schemas(kind: str) -> None:
    manifest = yaml.safe_load(MANIFESTS[kind].read_text())
    for template in pod_templates(manifest):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "clipforge"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("kind", MANIFESTS)
def test_credentials_come_from_a_secret_and_workers_request_gpus(kind: str) -> None:
    text = MANIFESTS[kind].read_text()
    manifest = yaml.safe_load(text)
    assert "AWS_SECRET_ACCESS_KEY=" not in text.replace("AWS_SECRET_ACCESS_KEY=...", "")
    for template in pod_templates(manifest):
        for container in template["spec"]["containers"]:
            assert {"secretRef": {"name": "clipforge-storage"}} in container["envFrom"]
            assert not any(e.get("name", "").startswith("AWS_SECRET") for e in container.get("env", []))
    workers = cluster_spec(manifest)["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers)
    assert cluster_spec(manifest)["authOptions"] == {"mode": "token"}


def test_rayjob_entrypoint_is_a_valid_clipforge_command() -> None:
    from flows.cli import cli

    manifest = yaml.safe_load(MANIFESTS["RayJob"].read_text())
    program, *args = shlex.split(manifest["spec"]["entrypoint"])
    assert program == "clipforge"
    with cli.make_context("clipforge", list(args)) as group:
        name, command, rest = cli.resolve_command(group, group.protected_args + group.args)
        assert name == "train"
        with command.make_context(name, rest, parent=group) as context:  # parses and checks every option
            assert context.params["data"].startswith("s3://") and context.params["output"].startswith("s3://")
    with pytest.raises(click.UsageError):  # and a wrong option would be caught
        command.make_context(name, [*rest, "--no-such-option"], parent=group)
