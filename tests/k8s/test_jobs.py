"""The on-demand Jobs (k8s/jobs/): their commands are ones the image has and the CLI accepts, and they use the
model, Milvus and encoder the RayService serves with."""

from __future__ import annotations

import argparse
import shlex
from importlib.metadata import distribution

import yaml

from mmrag.serving.cli import batch as batch_cli
from mmrag.serving.cli import ingest as ingest_cli
from mmrag.serving.config import MmragConfig, apply_override
from mmrag.serving.retrieval.config import RetrievalConfig
from tests.k8s.manifests import K8S, mmrag_app, only, rayservice, render, serve_config

JOBS = K8S / "jobs"


def docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((JOBS / name).read_text()))


def prod() -> MmragConfig:
    return MmragConfig.model_validate(mmrag_app(serve_config("overlays/prod-gpu"))["args"])


def console_scripts(dist: str) -> set[str]:
    return {e.name for e in distribution(dist).entry_points if e.group == "console_scripts"}


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_ingest_job_writes_where_the_retriever_searches():
    (job,) = docs("ingest-documents.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["mmrag", "ingest"]
    args = parse(ingest_cli.add_arguments, command[2:])
    overrides: dict = {}
    for item in args.overrides:
        apply_override(overrides, item)
    job_config = MmragConfig.model_validate(overrides)
    served = prod().retrieval
    assert (job_config.retrieval.uri, job_config.retrieval.db_name) == (served.uri, served.db_name)
    assert (args.collection or job_config.retrieval.collection) == served.collection
    # The Job embeds and chunks with the defaults: the serve config must too, or searches miss.
    assert served.encoder == RetrievalConfig().encoder and served.chunking == RetrievalConfig().chunking
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert all(path in mounts for path in args.paths)
    env = {e["name"]: e for e in container["env"]}
    assert env["MMRAG_MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mmrag-milvus", "key": "token"}


def test_download_job_fills_the_served_model_path():
    (job,) = docs("download-model.yaml")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[0] in console_scripts("huggingface_hub") and command[1] == "download"
    target = command[command.index("--local-dir") + 1]
    assert target == prod().model.path
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
    assert only(render("overlays/prod-gpu"), "PersistentVolumeClaim", claim)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "0", "the one pod that downloads"


def test_batch_rayjob_runs_the_served_model_on_its_own_cluster():
    config_map, rayjob = docs("rayjob-batch.yaml")
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["mmrag", "batch"]
    args = parse(batch_cli.add_arguments, words[2:])
    assert args.ray
    config = MmragConfig.model_validate(yaml.safe_load(config_map["data"][args.config.rsplit("/", 1)[1]]))
    assert config.server.ray_address == "auto", "join the RayJob's cluster, not a local one"
    assert config.model == prod().model and config.engine == prod().engine
    assert config.retrieval.uri == prod().retrieval.uri and config.retrieval.db_name == prod().retrieval.db_name
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == rayservice("overlays/prod-gpu")["spec"]["rayClusterConfig"]["rayVersion"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    for path in (args.input, args.output, args.config):
        assert any(path.startswith(m + "/") for m in mounts), path


def test_the_dev_milvus_server_command_is_in_the_image():
    deployment = only(render("overlays/dev-cpu"), "Deployment", "mmrag-milvus-lite")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] in console_scripts("milvus-lite")
