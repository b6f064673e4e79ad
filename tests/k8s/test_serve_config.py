"""The Serve config KubeRay would deploy (serveConfigV2 of the rendered RayService) is one Serve and the
app accept, and its autoscaling, resources and probes fit the Ray cluster the overlay describes."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from mmrag.serving.config import MmragConfig
from tests.k8s.manifests import (
    IMPORT_PATH,
    K8S,
    OVERLAYS,
    SERVE_PORT,
    fits,
    mmrag_app,
    only,
    pod_templates,
    ray_container,
    ray_node_resources,
    rayservice,
    render,
    replica_needs,
    serve_config,
)


def app_config(overlay: str) -> MmragConfig:
    return MmragConfig.model_validate(mmrag_app(serve_config(f"overlays/{overlay}"))["args"])


def deployments(config: MmragConfig) -> dict[str, object]:
    return {name: getattr(config.deployments, name) for name in type(config.deployments).model_fields}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_accepts_the_config(overlay):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config(f"overlays/{overlay}"))
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert schema.http_options.host == "0.0.0.0", "the proxy must listen on the pod's address"
    assert schema.http_options.port == SERVE_PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_args_are_an_mmrag_config(overlay):
    config = app_config(overlay)
    http = serve_config(f"overlays/{overlay}")["http_options"]
    assert config.server.port == http["port"] and config.server.host == http["host"]
    assert config.server.request_timeout_s == http["request_timeout_s"]
    assert config.server.ray_address is None and config.server.ray_num_cpus is None, "the cluster is KubeRay's"


def test_a_typo_in_args_is_an_error():
    args = mmrag_app(serve_config("overlays/dev-cpu"))["args"]
    args["deployments"]["llm"]["autoscalling"] = args["deployments"]["llm"].pop("autoscaling")
    with pytest.raises(ValueError, match="autoscalling"):
        MmragConfig.model_validate(args)


def test_dev_runs_the_embedded_model_and_prod_a_checkpoint():
    assert app_config("dev-cpu").model.path is None
    prod = app_config("prod-gpu")
    assert prod.model.path and prod.deployments.llm.num_gpus == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_autoscales_sensibly(overlay):
    for name, dep in deployments(app_config(overlay)).items():
        scale = dep.autoscaling
        if scale is None:
            continue
        assert 1 <= scale.min_replicas <= scale.max_replicas, name
        # Serve never puts more than max_ongoing_requests on a replica: a target at or above it would
        # never be exceeded, and the deployment would never scale up.
        assert scale.target_ongoing_requests < dep.max_ongoing_requests, name
        # Release capacity more slowly than it is added (no flapping across a short dip).
        assert scale.downscale_delay_s >= scale.upscale_delay_s, name
    llm = app_config(overlay).deployments.llm
    assert llm.autoscaling is not None and llm.autoscaling.max_replicas > llm.autoscaling.min_replicas, (
        "the LLM stage must be able to scale"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_fit_the_worker_groups(overlay):
    """Each replica fits one worker pod of some group, and all deployments at their max_replicas fit the
    worker groups at their maxReplicas: otherwise Serve would ask for replicas the Ray autoscaler can
    never place (they stay PENDING)."""
    groups = rayservice(f"overlays/{overlay}")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    shapes = [ray_node_resources(g) for g in groups]
    demand: dict[int, dict[str, float]] = {}  # per group: the replicas that can only go there
    for name, dep in deployments(app_config(overlay)).items():
        need = replica_needs(dep)
        assert need["CPU"] > 0, f"{name}: num_cpus 0 would let replicas land on the head"
        homes = [i for i, shape in enumerate(shapes) if fits(need, shape)]
        assert homes, f"{name} fits no worker pod"
        assert len(homes) == 1, f"{name} may land on several groups: {[groups[i]['groupName'] for i in homes]}"
        count = dep.autoscaling.max_replicas if dep.autoscaling else dep.num_replicas
        for r, amount in need.items():
            demand.setdefault(homes[0], {}).setdefault(r, 0.0)
            demand[homes[0]][r] += count * amount
    for index, needs in demand.items():
        for r, amount in needs.items():
            capacity = shapes[index].get(r, 0.0) * groups[index]["maxReplicas"]
            assert amount <= capacity, f"{groups[index]['groupName']} {r}: max demand {amount} > capacity {capacity}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pods_hold_only_gpu_work(overlay):
    """A CPU-only replica on a GPU pod keeps that pod (and its GPU node) alive after the LLM scales in: the
    CPU-only deployments ask for a resource only the CPU groups advertise, so they never fit a GPU pod."""
    groups = rayservice(f"overlays/{overlay}")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for name, dep in deployments(app_config(overlay)).items():
        for group in groups:
            shape = ray_node_resources(group)
            if shape["GPU"] > 0 and dep.num_gpus == 0:
                assert not fits(replica_needs(dep), shape), f"{name} could land on {group['groupName']}"


def test_the_second_llm_replica_needs_a_new_pod_in_dev():
    """Both levels of autoscaling are exercised by the dev cluster: at min_replicas everything fits on the
    minimum pods, at max_replicas the LLM needs more pods than the minimum."""
    (group,) = rayservice("overlays/dev-cpu")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    cpus = ray_node_resources(group)["CPU"]
    config = app_config("dev-cpu")
    at_min = sum(
        d.num_cpus * (d.autoscaling.min_replicas if d.autoscaling else d.num_replicas)
        for d in deployments(config).values()
    )
    at_max = sum(
        d.num_cpus * (d.autoscaling.max_replicas if d.autoscaling else d.num_replicas)
        for d in deployments(config).values()
    )
    assert at_min <= cpus * group["minReplicas"] < at_max


KUBERAY_VERSION = "1.7.0"  # the operator release whose RayService CRD the tests check (k8s/README.md pins it)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_the_ones_kuberay_injects(overlay):
    """KubeRay (1.7) gives every Ray container a liveness and a readiness probe on the Ray node itself (raylet,
    plus GCS on the head; 30 s + 120 x 5 s before a restart, which covers `ray start` on a cold node), and
    RayService workers a readiness that adds this pod's Serve proxy (`:<serve port>/-/healthz`). None waits
    for the model (the head must be Ready before KubeRay submits the serve config; a model load or an engine
    fault must never restart a Ray pod). Hand-written copies only drift from them: there are none."""
    for group, template in pod_templates(rayservice(f"overlays/{overlay}")).items():
        container = ray_container(template)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind not in container, f"{group}: {kind} duplicates KubeRay's"
        # KubeRay's worker readiness finds the proxy by the port named "serve".
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == SERVE_PORT, group
    readme = (K8S / "README.md").read_text()
    assert f"--version {KUBERAY_VERSION}" in readme, "pin the operator whose probes and CRD the tests assume"


def test_dev_milvus_is_a_server_both_clusters_of_an_upgrade_share():
    """A Lite file opened inside the retriever stays locked by the old cluster during a NewCluster upgrade,
    and the new cluster's retriever never starts: dev serves the file from one Deployment instead."""
    config = app_config("dev-cpu")
    assert not config.retrieval.is_lite()
    uri = urlparse(config.retrieval.uri)
    objects = render("overlays/dev-cpu")
    service = only(objects, "Service", uri.hostname)
    (port,) = service["spec"]["ports"]
    assert port["port"] == uri.port
    deployment = only(objects, "Deployment", uri.hostname)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "the old pod must release the directory first"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["milvus-lite", "server"]
    data_dir = command[command.index("--data-dir") + 1]
    assert command[command.index("--port") + 1] == str(uri.port)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [path for path in mounts if data_dir.startswith(path + "/")]
    assert volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"] == "mmrag-milvus-lite"
    for group, template in pod_templates(rayservice("overlays/dev-cpu")).items():
        claims = [v for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert not claims, f"{group} mounts the Lite data itself"


def test_prod_gets_no_demo_corpus():
    assert not app_config("prod-gpu").retrieval.ingest_demo_corpus


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_arguments_build(overlay, monkeypatch):
    """The engine section becomes vLLM engine arguments (unknown engine_kwargs fail here, not on a GPU)."""
    pytest.importorskip("vllm")
    import huggingface_hub.constants

    # Offline (set by other tests' conftests), vLLM resolves a model path that does not exist here as a Hub
    # repo id and fails; on the cluster the path exists.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from mmrag.serving.engine.args import build_engine_args

    config = app_config(overlay)
    engine_args = build_engine_args(config, config.model.path or "/var/cache/mmrag/tiny")
    assert engine_args.max_model_len == config.engine.max_model_len
    assert engine_args.served_model_name == [config.model.served_name]
    for key, value in config.engine.engine_kwargs.items():
        assert getattr(engine_args, key) == value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_proxy_reaches_the_ingress_as_mmrag_serve_has_it(overlay):
    """The Ray containers' environment carries the Serve transport `mmrag serve` sets on one machine (gRPC)."""
    from mmrag.serving.cli.serve import SERVE_TRANSPORT

    objects = render(f"overlays/{overlay}")
    env = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mmrag-env"))
    assert SERVE_TRANSPORT.items() <= env["data"].items()
