"""The exact Serve configuration Kubernetes would run, running here.

The dev-cpu overlay is rendered, its RayService's serveConfigV2 is extracted and submitted the way KubeRay
submits it: PUT /api/serve/applications/ on the Ray dashboard, with a token (authOptions mode: token).
The pods' environment comes from the rendered ConfigMap and Secrets, the local Ray node gets the worker group's
custom resources, and the dev Milvus Lite server runs with the rendered Deployment's command. Only what a laptop
cannot have is changed: the HTTP proxy binds 127.0.0.1 on a free port instead of 0.0.0.0:8000, the Milvus Lite
server 127.0.0.1 on a free port instead of its Service, and each volume becomes a temporary directory. One app
start for the whole module.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.k8s.manifests import mmrag_app, only, pod_templates, ray_container, render

pytestmark = pytest.mark.e2e
DEPLOY_TIMEOUT_S = 600
APP = "mmrag"
# The local Ray cluster: one driver process (own environment, like a pod's), stopped with its cluster.
DRIVER = """
import json, signal, sys, ray
ray.init(
    num_cpus=4,
    resources=json.loads(sys.argv[2]),
    include_dashboard=True,
    dashboard_host="127.0.0.1",
    dashboard_port=int(sys.argv[1]),
    _metrics_export_port=int(sys.argv[3]),
)
print("ray up", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remap(value, paths: dict[str, str]):
    """Replace pod mount paths by local directories, in strings nested anywhere in `value`."""
    if isinstance(value, str):
        for pod_path, local in paths.items():
            if value == pod_path or value.startswith(pod_path + "/"):
                return local + value[len(pod_path) :]
        return value
    if isinstance(value, dict):
        return {k: remap(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, paths) for v in value]
    return value


def pod_environment(objects, paths) -> dict[str, str]:
    """The env of the dev worker container: envFrom ConfigMaps plus secretKeyRef values."""
    rs = only(objects, "RayService", "mmrag")
    container = ray_container(pod_templates(rs)["cpu-workers"])
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(only(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            secret = only(objects, "Secret", ref["name"])
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return {k: remap(v, paths) for k, v in env.items()}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    pytest.importorskip("mmrag.deployments.app")
    import yaml

    objects = render("overlays/dev-cpu")
    rs = only(objects, "RayService", "mmrag")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    worker = ray_container(pod_templates(rs)["cpu-workers"])
    root = tmp_path_factory.mktemp("pod")
    paths = {m["mountPath"]: str(root / m["name"]) for m in worker["volumeMounts"]}
    for local in paths.values():
        Path(local).mkdir(parents=True, exist_ok=True)

    args = mmrag_app(config)["args"]
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    config = remap(config, paths)
    milvus, milvus_uri = start_milvus_lite(objects, root)
    mmrag_app(config)["args"]["retrieval"]["uri"] = milvus_uri
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = {name: float(value) for name, value in group.get("resources", {}).items()}
    metrics_port = free_port()
    token = uuid.uuid4().hex
    env = {**os.environ, **pod_environment(objects, paths), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    dashboard_port = free_port()
    headers = {"Authorization": f"Bearer {token}"}
    log_path = root / "ray-driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(dashboard_port), json.dumps(resources), str(metrics_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        dashboard = httpx.Client(base_url=f"http://127.0.0.1:{dashboard_port}", headers=headers, timeout=30)
        wait_for(lambda: dashboard.get("/api/gcs_healthz").status_code == 200, 180, "dashboard", driver, log_path)
        # The first PUT starts Serve's controller before it answers: slow on a loaded machine.
        response = dashboard.put("/api/serve/applications/", json=config, timeout=300)
        assert response.status_code == 200, response.text
        status = wait_for_app(dashboard)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 120, "/health")
        yield {
            "base": base,
            "args": args,
            "status": status,
            "api_key": env.get("MMRAG_API_KEYS", "").split(",")[0],
            "ray_metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }
    finally:
        milvus.terminate()
        try:
            milvus.wait(timeout=30)
        except subprocess.TimeoutExpired:
            milvus.kill()
            milvus.wait()
        if driver.poll() is None:
            driver.send_signal(signal.SIGTERM)  # the driver shuts its cluster down
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()


def start_milvus_lite(objects, root: Path) -> tuple[subprocess.Popen, str]:
    """The dev Milvus Lite server, run with its Deployment's command on loopback and a free port."""
    deployment = only(objects, "Deployment", "mmrag-milvus-lite")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    port = free_port()
    for flag, value in (
        ("--data-dir", str(root / "milvus" / "mmrag.db")),
        ("--host", "127.0.0.1"),
        ("--port", str(port)),
    ):
        command[command.index(flag) + 1] = value
    (root / "milvus").mkdir(exist_ok=True)
    executable = Path(sys.executable).with_name(command[0])
    log = open(root / "milvus-lite.log", "w")  # noqa: SIM115 - the server's output, kept for its lifetime
    server = subprocess.Popen([str(executable), *command[1:]], stdout=log, stderr=subprocess.STDOUT)

    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepting, 60, "milvus-lite server")
    return server, f"http://127.0.0.1:{port}"


def wait_for(predicate, timeout_s: float, what: str, process=None, log_path=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Ray driver exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


def wait_for_app(dashboard: httpx.Client) -> dict:
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    app: dict = {}
    while time.monotonic() < deadline:
        app = dashboard.get("/api/serve/applications/").json().get("applications", {}).get(APP, {})
        if app.get("status") == "RUNNING":
            return app
        if app.get("status") == "DEPLOY_FAILED":
            raise AssertionError(f"Serve could not deploy the rendered config: {app.get('message')}")
        time.sleep(2)
    raise TimeoutError(f"application not RUNNING after {DEPLOY_TIMEOUT_S}s: {json.dumps(app)[:3000]}")


def test_serve_runs_the_deployments_with_the_overlays_scaling(deployed):
    """Serve runs each stage with the replicas and autoscaling the overlay asked for (args reached Serve)."""
    args = deployed["args"]
    deployments = deployed["status"]["deployments"]
    sections = {"OpenAIIngress": "ingress", "LLMServer": "llm", "Retriever": "retriever"}
    assert {"OpenAIIngress", "LLMServer"} <= deployments.keys()
    for name, state in deployments.items():
        assert state["status"] == "HEALTHY", name
        wanted = args["deployments"][sections[name]]
        config = state["deployment_config"]
        if "autoscaling" in wanted:
            autoscaling = config["autoscaling_config"]
            for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
                assert autoscaling[key] == wanted["autoscaling"][key], (name, key)
        else:
            assert config["num_replicas"] == wanted.get("num_replicas", 1), name
        assert config["max_ongoing_requests"] == wanted["max_ongoing_requests"], name
        assert config["ray_actor_options"]["num_cpus"] == wanted["num_cpus"], name


def test_health_models_and_a_chat(deployed):
    base, key = deployed["base"], deployed["api_key"]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    models = httpx.get(f"{base}/v1/models", headers=headers, timeout=30)
    assert models.status_code == 200
    served = deployed["args"]["model"]["served_name"]
    assert served in [m["id"] for m in models.json()["data"]]
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        headers=headers,
        json={"model": served, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1


def test_single_process_metrics_endpoint(deployed):
    text = httpx.get(f"{deployed['base']}/metrics", timeout=30).text
    for name in (
        "mmrag_requests_total",
        "mmrag_time_to_first_token_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in text, name


def test_ray_exports_the_ingress_metrics_the_dashboard_reads(deployed):
    """What Prometheus scrapes in the cluster: Ray's metrics port, where the ingress replica's metrics appear
    under the names tests/k8s/test_observability.py checks the dashboard against."""
    from mmrag.serving.metrics import METRICS

    key, served = deployed["api_key"], deployed["args"]["model"]["served_name"]
    chat = httpx.post(  # at least one request counted
        f"{deployed['base']}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"} if key else {},
        json={"model": served, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    wanted = {"ray_mmrag_requests_total", "ray_mmrag_request_latency_seconds_bucket"}
    assert wanted <= set().union(*(spec.exported_names(ray=True) for spec in METRICS.values()))
    text = ""

    def exported() -> bool:
        nonlocal text
        text = httpx.get(deployed["ray_metrics"], timeout=10).text
        return all(f"\n{name}{{" in text for name in wanted)

    try:
        wait_for(exported, 90, "the ingress metrics on Ray's metrics port")
    except TimeoutError:
        names = sorted({line.split("{")[0] for line in text.splitlines() if "mmrag" in line})
        raise AssertionError(f"Ray exports these mmrag series: {names}") from None
    lines = [x for x in text.splitlines() if x.startswith("ray_mmrag_requests_total{") and 'status="200"' in x]
    assert lines and 'deployment="OpenAIIngress"' in lines[0] and "replica=" in lines[0], "one series per replica"
