"""The Serve config KubeRay would deploy (serveConfigV2 of the rendered RayService) is one Serve and the
app accept, and its autoscaling, resources and probes fit the Ray cluster the overlay describes."""

from __future__ import annotations

import pytest

from mmrag.serving.config import MmragConfig
from tests.k8s.manifests import (
    IMPORT_PATH,
    OVERLAYS,
    SERVE_PORT,
    mmrag_app,
    pod_templates,
    ray_container,
    ray_node_resources,
    rayservice,
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
    capacity = {r: sum(s[r] * g["maxReplicas"] for s, g in zip(shapes, groups, strict=True)) for r in ("CPU", "GPU")}
    demand = {"CPU": 0.0, "GPU": 0.0}
    for name, dep in deployments(app_config(overlay)).items():
        need = {"CPU": dep.num_cpus, "GPU": dep.num_gpus}
        assert need["CPU"] > 0, f"{name}: num_cpus 0 would let replicas land on the head"
        assert any(all(need[r] <= s[r] for r in need) for s in shapes), f"{name} fits no worker pod"
        count = dep.autoscaling.max_replicas if dep.autoscaling else dep.num_replicas
        for r in demand:
            demand[r] += count * need[r]
    for r in demand:
        assert demand[r] <= capacity[r], f"{r}: max demand {demand[r]} > cluster capacity {capacity[r]}"


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


def _budget(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _targets_app(probe: dict) -> bool:
    if "httpGet" in probe:
        return int(probe["httpGet"]["port"]) == SERVE_PORT
    return f":{SERVE_PORT}" in " ".join(probe.get("exec", {}).get("command", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_never_wait_for_or_restart_on_the_model(overlay):
    """A model load (minutes for a 7B model) or an engine failure must never restart a Ray pod, and the
    head must become Ready before KubeRay submits the Serve config (its readiness cannot wait for the app).
    Model readiness is the Serve application status, which KubeRay waits for before sending traffic."""
    for group, template in pod_templates(rayservice(f"overlays/{overlay}")).items():
        container = ray_container(template)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind in container, f"{group}: {kind} missing"
        assert not _targets_app(container["startupProbe"]), group
        assert not _targets_app(container["livenessProbe"]), group
        readiness = " ".join(container["readinessProbe"].get("exec", {}).get("command", []))
        if group == "head":
            assert not _targets_app(container["readinessProbe"]), "head readiness on the app would deadlock"
        else:
            # KubeRay's rule for RayService workers: Ready only when this pod's Serve proxy answers.
            assert f"localhost:{SERVE_PORT}/-/healthz" in readiness, group
            assert "/health " not in readiness + " ", "per-pod readiness must not depend on a cluster-wide engine"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_budgets_cover_ray_start(overlay):
    """`ray start` on a cold node (image layers, Python imports, dashboard agent) takes tens of seconds;
    the startup probe allows 5 minutes, and a live pod is restarted only after a sustained failure."""
    for group, template in pod_templates(rayservice(f"overlays/{overlay}")).items():
        container = ray_container(template)
        assert _budget(container["startupProbe"]) >= 300, group
        assert _budget(container["livenessProbe"]) >= 120, group
        for kind in ("startupProbe", "livenessProbe"):
            probe = container[kind]
            assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10), f"{group} {kind}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_milvus_lite_runs_one_retriever_on_a_mounted_volume(overlay):
    """Milvus Lite (a .db file) has one writer: the retriever must not scale, and the file must be on a
    PVC mounted by every worker (wherever Ray places the replica), not in the pod's ephemeral storage."""
    config = app_config(overlay)
    if not config.retrieval.is_lite():
        assert not config.retrieval.ingest_demo_corpus, "a production Milvus gets no demo corpus"
        return
    retriever = config.deployments.retriever
    assert retriever.autoscaling is None and retriever.num_replicas == 1
    db_dir = str(config.retrieval.lite_path().parent)
    rs = rayservice(f"overlays/{overlay}")
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        template = group["template"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ray_container(template)["volumeMounts"]}
        assert db_dir in mounts, f"{group['groupName']} does not mount {db_dir}"
        assert "persistentVolumeClaim" in volumes[mounts[db_dir]]


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
