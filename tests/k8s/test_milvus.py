"""Milvus wiring: the production values file for the official Helm chart and the Serve config agree on
where Milvus is, credentials stay out of files, and the token reaches the retriever from the Secret."""

from __future__ import annotations

from urllib.parse import urlparse

import yaml

from mmrag.serving.config import MmragConfig
from tests.k8s.manifests import K8S, mmrag_app, serve_config

VALUES = K8S / "milvus" / "values-prod.yaml"
RELEASE, NAMESPACE = "milvus", "milvus"  # k8s/README.md: helm upgrade --install milvus ... -n milvus


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def prod_retrieval():
    return MmragConfig.model_validate(mmrag_app(serve_config("overlays/prod-gpu"))["args"]).retrieval


def test_prod_uri_is_the_charts_proxy_service():
    uri = urlparse(prod_retrieval().uri)
    assert uri.hostname == f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    assert uri.port == values()["service"]["port"]
    assert not uri.username and not uri.password, "no credentials in the URI"
    assert not prod_retrieval().is_lite()


def test_values_enable_auth_and_hold_no_credentials():
    vals = values()
    assert vals["cluster"]["enabled"] is True
    user = yaml.safe_load(vals["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True
    assert vals["minio"]["existingSecret"], "MinIO credentials come from a Secret, not the chart defaults"
    text = VALUES.read_text().lower()
    for word in ("password:", "secretkey:", "accesskey:", "minioadmin", "token:"):
        assert word not in text, f"{word} in {VALUES.name}"


def test_serve_configs_hold_no_milvus_credentials():
    for overlay in ("dev-cpu", "prod-gpu"):
        args = mmrag_app(serve_config(f"overlays/{overlay}"))["args"]
        assert args.get("retrieval", {}).get("token") is None, overlay


def test_milvus_token_comes_from_the_secret_env(monkeypatch):
    monkeypatch.setenv("MMRAG_MILVUS_TOKEN", "mmrag:from-secret")
    retrieval = prod_retrieval()
    resolved = getattr(retrieval, "resolved_token", lambda: retrieval.token)()
    assert resolved == "mmrag:from-secret"
