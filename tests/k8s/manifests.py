"""Shared helpers of the Kubernetes tests: render the kustomize overlays, find objects, read the Serve
config KubeRay would deploy, and check objects against the RayService CRD schema (kept outside the repo)."""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev-cpu", "prod-gpu")
# KubeRay's RayService CRD, as data beside the repo (see ../shared/k8s-schemas/README.md); never copied in.
CRD_PATH = REPO.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.yaml"
IMPORT_PATH = "mmrag.deployments.app:build_app"
SERVE_PORT = 8000


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    return path


@functools.cache
def _render(target: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{target} failed:\n{result.stderr}")
    return result.stdout


def render(target: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize k8s/<target>` prints (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render(target)) if doc]


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rayservice(target: str) -> dict[str, Any]:
    return only(render(target), "RayService", "mmrag")


def pod_templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"head": template, "<groupName>": template, ...} of a RayService."""
    cluster = rs["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the pod's first container."""
    return template["spec"]["containers"][0]


def serve_config(target: str) -> dict[str, Any]:
    """The serveConfigV2 of the rendered RayService, parsed: exactly what KubeRay submits to Serve."""
    return yaml.safe_load(rayservice(target)["spec"]["serveConfigV2"])


def mmrag_app(config: dict[str, Any]) -> dict[str, Any]:
    apps = [a for a in config["applications"] if a["import_path"] == IMPORT_PATH]
    assert len(apps) == 1, f"expected one application importing {IMPORT_PATH}"
    return apps[0]


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "2", 4, "8Gi") as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {value!r}"
    number, suffix = match.groups()
    return float(number) * (suffixes[suffix] if suffix else 1)


def ray_node_resources(group: dict[str, Any]) -> dict[str, float]:
    """The resources Ray sees on one pod of a group: rayStartParams, else the container's limits rounded
    up (KubeRay's rule), GPUs from a limit whose name ends in "gpu"; the group's `resources` (custom ones
    included) override both."""
    params = group.get("rayStartParams") or {}
    limits = ray_container(group["template"]).get("resources", {}).get("limits", {})
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(limits.get("cpu", 0)))
    gpus = 0.0
    if "num-gpus" in params:
        gpus = float(params["num-gpus"])
    else:
        for key, value in limits.items():
            if key.endswith("gpu"):
                gpus = quantity(value)
    return {"CPU": cpus, "GPU": gpus, **{k: quantity(v) for k, v in (group.get("resources") or {}).items()}}


def replica_needs(stage: Any) -> dict[str, float]:
    """What one replica of a DeploymentConfig asks Ray for."""
    return {"CPU": stage.num_cpus, "GPU": stage.num_gpus, **stage.resources}


def fits(need: dict[str, float], shape: dict[str, float]) -> bool:
    return all(amount <= shape.get(name, 0.0) for name, amount in need.items())


# ---- RayService CRD schema -------------------------------------------------------------------------------


def crd_schema() -> dict[str, Any]:
    if not CRD_PATH.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {CRD_PATH} (../shared/k8s-schemas/)")
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `obj` that the structural schema does not declare. The API server prunes such fields
    silently, so a misspelt or misplaced field would be lost without an error: treat them as errors."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if path == "" and key in ("apiVersion", "kind", "metadata"):
                continue  # served by the API machinery, not the CRD's schema
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], where)
            elif isinstance(additional, dict):
                found += unknown_fields(value, additional, where)
            elif additional is True:
                continue
            else:
                found.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def crd_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Type/enum/required violations (jsonschema) plus undeclared fields, as readable lines."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"{p}: not in the RayService schema (would be pruned)" for p in unknown_fields(obj, schema)]
