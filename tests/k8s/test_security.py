"""Security of what we deploy: every pod passes Kubernetes' `restricted` Pod Security profile (the autoscaler
KubeRay adds included), the namespaces enforce it, the NetworkPolicies admit only the Serve port from outside and
let requests reach only the internet, and the public entry exposes only the API."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import K8S, OVERLAYS, SERVE_PORT, only, pod_templates, rayservice, render

# Volume types the `restricted` profile allows (Pod Security Standards, "Volume Types").
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
RESTRICTED_VOLUMES |= {"secret"}
JOBS = sorted((K8S / "jobs").glob("*.yaml"))


def restricted_violations(pod: dict[str, Any], extra_containers: list[dict[str, Any]] = ()) -> list[str]:
    """What keeps a pod spec out of the `restricted` profile (the checks of Kubernetes' Pod Security admission,
    restricted level, latest version): host namespaces and ports, volume types, privilege, escalation,
    capabilities, non-root, seccomp. ``extra_containers`` are containers the operator adds (KubeRay's
    autoscaler), checked with the pod's context like the others."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field} is set")
    if pod_sc.get("sysctls"):
        found.append("sysctls are set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *extra_containers]
    for container in containers:
        name = container.get("name", "?")
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {caps['add']}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{name}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def rayservice_pods(overlay: str) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """{group: (pod spec, operator-added containers)}: the head carries KubeRay's autoscaler container."""
    rs = rayservice(f"overlays/{overlay}")
    options = rs["spec"]["rayClusterConfig"].get("autoscalerOptions", {})
    autoscaler = {"name": "autoscaler", "securityContext": options.get("securityContext")}
    return {
        group: (template["spec"], [autoscaler] if group == "head" else [])
        for group, template in pod_templates(rs).items()
    }


def job_pods() -> dict[str, dict[str, Any]]:
    """Pod specs of the on-demand Jobs and the RayJob (k8s/jobs/)."""
    pods = {}
    for path in JOBS:
        for doc in yaml.safe_load_all(path.read_text()):
            kind = doc["kind"]
            if kind == "Job":
                pods[f"{path.name}:{doc['metadata']['name']}"] = doc["spec"]["template"]["spec"]
            elif kind == "RayJob":
                cluster = doc["spec"]["rayClusterSpec"]
                pods[f"{path.name}:head"] = cluster["headGroupSpec"]["template"]["spec"]
                for group in cluster["workerGroupSpecs"]:
                    pods[f"{path.name}:{group['groupName']}"] = group["template"]["spec"]
                pods[f"{path.name}:submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_pass_the_restricted_profile(overlay):
    for group, (pod, extra) in rayservice_pods(overlay).items():
        assert not restricted_violations(pod, extra), group


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_other_pods_pass_the_restricted_profile(overlay):
    for obj in render(f"overlays/{overlay}"):
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            assert not restricted_violations(obj["spec"]["template"]["spec"]), obj["metadata"]["name"]


def test_job_pods_pass_the_restricted_profile():
    pods = job_pods()
    assert len(pods) >= 5
    for name, pod in pods.items():
        assert not restricted_violations(pod), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_containers_have_a_read_only_root(overlay):
    """Where possible: Ray and the app write only to emptyDirs (/tmp, /dev/shm, the caches, $HOME)."""
    for group, (pod, _) in rayservice_pods(overlay).items():
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, group
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/var/cache/mmrag", "/home/ray"} <= mounts, group
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory", "Ray's object store lives in /dev/shm"


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("container", "allowPrivilegeEscalation", True),
        ("container", "capabilities", {"drop": ["NET_RAW"]}),
        ("container", "runAsNonRoot", False),
        ("pod", "seccompProfile", {"type": "Unconfined"}),
        ("container", "privileged", True),
    ],
)
def test_the_profile_check_catches_violations(where, field, value):
    pod, _ = rayservice_pods("prod-gpu")["gpu-workers"]
    pod = copy.deepcopy(pod)
    context = pod["securityContext"] if where == "pod" else pod["containers"][0]["securityContext"]
    context[field] = value
    if where == "pod":
        pod["containers"][0]["securityContext"].pop(field, None)
    assert restricted_violations(pod)


def test_the_profile_check_catches_an_unrestricted_autoscaler():
    pod, extra = rayservice_pods("dev-cpu")["head"]
    assert restricted_violations(pod, [{"name": "autoscaler", "securityContext": None}])
    assert not restricted_violations(pod, extra)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_enforce_the_restricted_profile(overlay):
    labels = only(render(f"overlays/{overlay}"), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# ---- network ------------------------------------------------------------------------------------------------

INTERNAL = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.10",
    "127.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "fe80::1",
    "::1",
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946"]


def _ip_allowed(rule: dict[str, Any], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    for peer in rule.get("to", []):
        block = peer.get("ipBlock")
        if block is None:
            continue
        network = ipaddress.ip_network(block["cidr"])
        if ip.version != network.version or ip not in network:
            continue
        if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
            return True
    return False


def _policies(overlay: str) -> list[dict[str, Any]]:
    return [o for o in render(f"overlays/{overlay}") if o["kind"] == "NetworkPolicy"]


def _selects_ray_worker(policy: dict[str, Any]) -> bool:
    labels = {"app.kubernetes.io/name": "mmrag", "app.kubernetes.io/component": "ray-worker"}
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_are_reachable_from_outside_only_on_the_serve_port(overlay):
    policies = [p for p in _policies(overlay) if _selects_ray_worker(p)]
    assert any("Ingress" in p["spec"]["policyTypes"] for p in policies), "no ingress policy on the Ray pods"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from"):  # from anywhere
                assert rule["ports"] == [{"port": SERVE_PORT, "protocol": "TCP"}], policy["metadata"]["name"]
            else:
                for peer in rule["from"]:
                    assert "ipBlock" not in peer, "in-cluster peers are named by selector"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_can_reach_the_internet_but_not_the_cluster_or_metadata(overlay):
    """Image URLs in requests are fetched by the ingress (a worker pod): internet yes, cluster ranges and the
    cloud metadata service no (the head's API-server rule aside, which selects the head only)."""
    worker_rules = [rule for p in _policies(overlay) if _selects_ray_worker(p) for rule in p["spec"].get("egress", [])]
    assert worker_rules
    for address in INTERNAL:
        assert not any(_ip_allowed(rule, address) for rule in worker_rules), address
    for address in PUBLIC:
        assert any(_ip_allowed(rule, address) for rule in worker_rules), address


def test_the_ip_check_can_fail():
    assert _ip_allowed({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}, "169.254.169.254")


def test_dev_milvus_lite_admits_only_the_ray_pods():
    (policy,) = [
        p
        for p in _policies("dev-cpu")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "mmrag-milvus-lite"
    ]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mmrag"}}}]
    assert "Egress" in policy["spec"]["policyTypes"] and not policy["spec"].get("egress"), "it reaches nothing"


def test_public_entry_exposes_only_the_api():
    """/metrics, /docs, /openapi.json (and whatever else the app serves) stay inside the cluster."""
    ingress = only(render("overlays/prod-gpu"), "Ingress", "mmrag")
    paths = [
        (path["path"], path["pathType"], path["backend"]["service"]["name"])
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert paths == [("/v1/", "Prefix", "mmrag-serve-svc"), ("/health", "Exact", "mmrag-serve-svc")]
    for private in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert not any(private.startswith(path.rstrip("/") + "/") or private == path for path, _, _ in paths)
    assert ingress["spec"]["tls"], "the public API is served over TLS"


def test_jobs_are_valid_core_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in JOBS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("Job", "ConfigMap"):
                kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            elif doc["kind"] == "RayJob":
                for name, pod in job_pods().items():
                    if name.startswith(f"{Path(path).name}:"):
                        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}}
                        template["template"] = {"spec": pod}
                        kubernetes_validate.validate(template, kubernetes_validate.latest_version(), strict=True)


def test_production_serves_no_playground():
    """The try-it page is on by default for local servers; the production overlay turns it off."""
    from tests.k8s.test_serve_config import app_config

    assert app_config("prod-gpu").server.playground is False
