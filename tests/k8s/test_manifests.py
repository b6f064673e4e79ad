"""The kustomize overlays render, and every object in them is one Kubernetes (or KubeRay) accepts."""

from __future__ import annotations

import base64
import copy

import pytest
import yaml

from tests.k8s.manifests import (
    K8S,
    OVERLAYS,
    SERVE_PORT,
    crd_errors,
    crd_schema,
    mmrag_app,
    only,
    pod_templates,
    ray_container,
    rayservice,
    render,
    serve_config,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# The oldest Kubernetes we support (k8s/README.md) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_KINDS = {
    "Namespace",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "Deployment",
    "Service",
    "Ingress",
}
_COMMON_KINDS = {
    "Namespace",
    "ConfigMap",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "RayService",
}
EXPECTED_KINDS = {
    "dev-cpu": _COMMON_KINDS | {"Secret", "Deployment", "Service"},  # + the Milvus Lite server
    "prod-gpu": _COMMON_KINDS | {"PodMonitor", "Ingress"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    kinds = {o["kind"] for o in render(f"overlays/{overlay}")}
    assert kinds == EXPECTED_KINDS[overlay]
    namespaces = {o["metadata"].get("namespace") for o in render(f"overlays/{overlay}") if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, "every object lands in the overlay's namespace"


def test_base_renders():
    assert only(render("base"), "RayService", "mmrag")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_strictly(overlay, version):
    """Built-in kinds against Kubernetes' own OpenAPI schema, unknown fields rejected."""
    objects = [o for o in render(f"overlays/{overlay}") if o["kind"] in CORE_KINDS]
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pod_templates_validate_strictly(overlay, version):
    """The CRD embeds pod templates; check each as a core v1 PodTemplate (probes, volumes, resources)."""
    for group, template in pod_templates(rayservice(f"overlays/{overlay}")).items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(wrapper, version, strict=True)


def test_pod_template_validation_can_fail():
    template = copy.deepcopy(pod_templates(rayservice("overlays/dev-cpu"))["head"])
    ray_container(template)["securityContex"] = ray_container(template).pop("securityContext")
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrapper, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_matches_the_crd_schema(overlay):
    errors = crd_errors(rayservice(f"overlays/{overlay}"), crd_schema())
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        (("spec", "rayClusterConfig", "enableInTreeAutoscalling"), True, "not in the RayService schema"),
        (("spec", "rayClusterConfig", "autoscalerOptions", "upscalingMode"), "Fast", "is not one of"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "1", "is not of type"),
    ],
)
def test_crd_check_catches_mistakes(path, value, expect):
    rs = rayservice("overlays/dev-cpu")
    node = rs
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(expect in line for line in crd_errors(rs, crd_schema()))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_settings(overlay):
    rs = rayservice(f"overlays/{overlay}")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True, "without it Serve's new replicas never get pods"
    assert cluster["authOptions"]["mode"] == "token", "Ray's dashboard/job API must not be open"
    assert cluster["rayVersion"] == __import__("ray").__version__, "rayVersion must match the image's Ray"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no replicas on the head"
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert mmrag_app(serve_config(f"overlays/{overlay}"))["route_prefix"] == "/"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_in_the_rayservice_is_the_overlays_file(overlay):
    """The kustomize replacement copies the overlay's file, not the base's."""
    source = (K8S / "overlays" / overlay / "serve-config.yaml").read_text()
    objects = render(f"overlays/{overlay}")
    assert only(objects, "RayService", "mmrag")["spec"]["serveConfigV2"] == source
    assert only(objects, "ConfigMap", "mmrag-serve-config")["data"]["serveConfigV2"] == source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_containers_are_consistent(overlay):
    """Every Ray pod (head and each worker group) runs the same image with the same configuration and
    secrets, and exposes the Serve and metrics ports the Services and the PodMonitor use."""
    templates = pod_templates(rayservice(f"overlays/{overlay}"))
    containers = {group: ray_container(t) for group, t in templates.items()}
    images = {c["image"] for c in containers.values()}
    assert len(images) == 1 and ":" in next(iter(images)), f"one tagged image, got {images}"
    env_refs = {g: (yaml.safe_dump(c.get("envFrom")), yaml.safe_dump(c.get("env"))) for g, c in containers.items()}
    assert len(set(env_refs.values())) == 1, f"env differs between Ray pods: {env_refs}"
    for group, container in containers.items():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == SERVE_PORT and ports["metrics"] == 8080, group
        assert templates[group]["metadata"]["labels"]["app.kubernetes.io/name"] == "mmrag"


def _referenced(rs, field):
    refs = set()
    if field == "secretKeyRef":  # the GCS's Redis password (prod: gcsFaultToleranceOptions)
        options = rs["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions", {})
        ref = options.get("redisPassword", {}).get("valueFrom", {}).get(field)
        if ref:
            refs.add((ref["name"], ref["key"]))
    for template in pod_templates(rs).values():
        spec = template["spec"]
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get(field)
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                if field == "configMapKeyRef" and "configMapRef" in source:
                    refs.add((source["configMapRef"]["name"], None))
        if field == "persistentVolumeClaim":
            refs |= {(v[field]["claimName"], None) for v in spec.get("volumes", []) if field in v}
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay):
    """ConfigMaps (hash-suffixed) and PVCs the pod templates name exist in the rendered overlay."""
    objects = render(f"overlays/{overlay}")
    rs = only(objects, "RayService", "mmrag")
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name, _ in _referenced(rs, "configMapKeyRef"):
        assert ("ConfigMap", name) in names, f"ConfigMap {name} is referenced but not rendered"
    for name, _ in _referenced(rs, "persistentVolumeClaim"):
        assert ("PersistentVolumeClaim", name) in names, f"PVC {name} is referenced but not rendered"


def _secret_keys(secrets):
    keys = {}
    for secret in secrets:
        data = {
            **{k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()},
            **secret.get("stringData", {}),
        }
        keys[secret["metadata"]["name"]] = data
    return keys


def test_dev_secrets_resolve_and_are_placeholders():
    objects = render("overlays/dev-cpu")
    secrets = _secret_keys([o for o in objects if o["kind"] == "Secret"])
    for name, key in _referenced(only(objects, "RayService", "mmrag"), "secretKeyRef"):
        assert name in secrets and key in secrets[name], f"secret {name}/{key} is referenced but not rendered"
    assert secrets, "dev generates its Secrets"
    for name, data in secrets.items():
        for key, value in data.items():
            assert value == "" or "change-me" in value, f"{name}/{key} must be a visible placeholder"


def test_prod_secrets_are_documented_placeholders_and_not_applied():
    """prod's Secrets are created by the operator of the cluster; the example names every key the pods
    read, holds placeholders only, and is not part of the kustomization (apply -k never overwrites them)."""
    objects = render("overlays/prod-gpu")
    assert not [o for o in objects if o["kind"] == "Secret"]
    example = list(yaml.safe_load_all((K8S / "overlays/prod-gpu/secrets.example.yaml").read_text()))
    for secret in example:
        kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
        assert secret["metadata"]["namespace"] == only(objects, "Namespace")["metadata"]["name"]
    secrets = _secret_keys(example)
    refs = _referenced(only(objects, "RayService", "mmrag"), "secretKeyRef")
    assert {(n, k) for n, keys in secrets.items() for k in keys} == refs
    for name, data in secrets.items():
        if name == "mmrag-milvus":
            assert "REPLACE-ME" in data["token"]
        else:
            assert all("REPLACE-ME" in v for v in data.values()), name


def test_pdbs_select_the_ray_pods():
    rs = rayservice("overlays/prod-gpu")
    templates = pod_templates(rs)
    pdbs = [o for o in render("overlays/prod-gpu") if o["kind"] == "PodDisruptionBudget"]
    for group, template in templates.items():
        labels = template["metadata"]["labels"]
        matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, f"{group}: exactly one PDB must cover it"
        # One pod at a time, and never none: minAvailable 1 over the single head pod blocked every node drain.
        assert matching[0]["spec"] == {**matching[0]["spec"], "maxUnavailable": 1}
        assert "minAvailable" not in matching[0]["spec"], group
        if group != "head":
            # workers without a replica are never Ready: they must not hold the budget
            assert matching[0]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_prod_head_survives_restarts_with_gcs_fault_tolerance():
    """KubeRay's HA setup: the GCS keeps its state in an external Redis, so losing the head (an eviction the
    PDB now allows) restarts it without taking the workers and their replicas down."""
    options = rayservice("overlays/prod-gpu")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"].endswith(":6379")
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "mmrag-redis", "key": "password"}
    assert "gcsFaultToleranceOptions" not in rayservice("overlays/dev-cpu")["spec"]["rayClusterConfig"]


def test_gpu_group_requests_gpus_and_mounts_the_model_cache():
    rs = rayservice("overlays/prod-gpu")
    (gpu,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    container = ray_container(gpu["template"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    model_path = mmrag_app(serve_config("overlays/prod-gpu"))["args"]["model"]["path"]
    assert model_path.startswith("/models/"), "the served model lives on the model-cache PVC"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
