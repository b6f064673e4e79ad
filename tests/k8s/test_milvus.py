"""Milvus wiring: the values files for the official Helm chart, checked against the chart's own templates, and
the Serve config, which must agree on where Milvus is; credentials stay out of files, MinIO's keys reach every
Milvus component, and the token reaches the retriever from the Secret."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest
import yaml

from mmrag.serving.config import MmragConfig
from tests.k8s import milvus_chart
from tests.k8s.manifests import K8S, mmrag_app, quantity, serve_config

MODES = ("cluster", "standalone")
RELEASE, NAMESPACE = "milvus", "milvus"  # k8s/README.md: helm upgrade --install milvus ... -n milvus
# The Milvus Deployments each mode runs (the chart test below derives the same sets from the chart's guards).
COMPONENTS = {
    "cluster": {"proxy", "queryNode", "dataNode", "mixCoordinator", "streamingNode"},
    "standalone": {"standalone"},
}
MINIO_ENV = {"MINIO_ACCESS_KEY_ID": "accessKeyID", "MINIO_SECRET_ACCESS_KEY": "secretAccessKey"}
SECRET_KEYS = {"MINIO_ACCESS_KEY_ID": "accesskey", "MINIO_SECRET_ACCESS_KEY": "secretkey"}  # what MinIO reads


def milvus_env_key(name: str) -> str:
    """How Milvus matches an environment variable to a config key (paramtable's env formatter: lower case,
    no "milvus." prefix, no "/", "_" or "."); the environment outranks the config files."""
    key = name.lower().removeprefix("milvus.")
    return re.sub(r"[/_.]", "", key)


def prod_retrieval():
    return MmragConfig.model_validate(mmrag_app(serve_config("overlays/prod-gpu"))["args"]).retrieval


@pytest.mark.parametrize("mode", MODES)
def test_prod_uri_is_the_charts_proxy_service(mode):
    uri = urlparse(prod_retrieval().uri)
    assert uri.hostname == f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    assert uri.port == milvus_chart.our_values(mode)["service"]["port"]
    assert not uri.username and not uri.password, "no credentials in the URI"
    assert not prod_retrieval().is_lite()


@pytest.mark.parametrize("path", [*milvus_chart.VALUES_FILES.values(), milvus_chart.TLS_VALUES], ids=lambda p: p.name)
def test_values_enable_auth_and_hold_no_credentials(path):
    vals = yaml.safe_load(path.read_text())
    user = yaml.safe_load(vals["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True, "helm replaces user.yaml whole"
    text = yaml.safe_dump(vals).lower()  # the values, not the comments that explain the defaults
    for word in ("password:", "secretkey:", "accesskey:", "minioadmin", "token:"):
        assert word not in text, f"{word} in {path.name}"


@pytest.mark.parametrize("mode", MODES)
def test_every_milvus_component_reads_minio_keys_from_minios_secret(mode):
    """The chart writes minio.accessKey/secretKey (default minioadmin) into milvus.yaml; MinIO takes its keys
    from existingSecret. Each Milvus component must get that Secret's keys as the variables that override
    minio.accessKeyID / minio.secretAccessKey, or it cannot reach its object storage."""
    vals = milvus_chart.our_values(mode)
    secret = vals["minio"]["existingSecret"]
    assert secret
    for component in COMPONENTS[mode]:
        env = {e["name"]: e for e in vals[component]["extraEnv"]}
        for name, key in SECRET_KEYS.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, (component, name)
        assert milvus_env_key(name) == milvus_env_key(f"minio.{MINIO_ENV[name]}")


def test_milvus_env_formatter_matches_only_its_key():
    assert milvus_env_key("MINIO_ACCESS_KEY_ID") == milvus_env_key("minio.accessKeyID")
    assert milvus_env_key("MINIO_ACCESS_KEY") != milvus_env_key("minio.accessKeyID"), "MinIO's own name is not it"


def test_cluster_mode_logs_to_woodpecker_not_pulsar():
    vals = milvus_chart.our_values("cluster")
    assert vals["woodpecker"]["enabled"] is True
    assert vals.get("streaming", {}).get("woodpecker", {}).get("embedded", True) is True, "no Woodpecker pods"
    for queue in ("pulsarv3", "pulsar", "kafka"):
        assert vals[queue]["enabled"] is False, queue
    assert "indexNode" not in vals, "Milvus 2.6 has no index node: sizing one does nothing"


def _footprint(mode: str) -> tuple[int, float]:
    """(pods, GiB of volumes) the values deploy; every count and size is explicit in our files."""
    vals = milvus_chart.our_values(mode)
    pods = sum(vals[c]["replicas"] for c in COMPONENTS[mode]) + vals["minio"]["replicas"] + vals["etcd"]["replicaCount"]
    gib = vals["minio"]["replicas"] * quantity(vals["minio"]["persistence"]["size"])
    gib += vals["etcd"]["replicaCount"] * quantity(vals["etcd"]["persistence"]["size"])
    if mode == "standalone":
        gib += quantity(vals["standalone"]["persistence"]["persistentVolumeClaim"]["size"])
    return pods, gib / 2**30


@pytest.mark.parametrize("mode", MODES)
def test_header_states_what_the_values_deploy(mode):
    """The comments at the top of each file say how many pods and how much storage it costs; they must match."""
    text = milvus_chart.VALUES_FILES[mode].read_text()
    pods, gib = _footprint(mode)
    assert re.search(rf"^#\s+pods: {pods} \(", text, re.M), f"header pods != {pods}"
    assert re.search(rf"^#\s+volumes: {gib:g} Gi \(", text, re.M), f"header volumes != {gib:g} Gi"


def test_tls_values_serve_tls_from_the_mounted_secret():
    vals = yaml.safe_load(milvus_chart.TLS_VALUES.read_text())
    user = yaml.safe_load(vals["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["tlsMode"] in (1, 2)
    (mount,) = vals["volumeMounts"]
    (volume,) = vals["volumes"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    for path in (user["tls"]["serverPemPath"], user["tls"]["serverKeyPath"]):
        assert path.startswith(mount["mountPath"] + "/")


def test_serve_configs_hold_no_milvus_credentials():
    for overlay in ("dev-cpu", "prod-gpu"):
        args = mmrag_app(serve_config(f"overlays/{overlay}"))["args"]
        assert args.get("retrieval", {}).get("token") is None, overlay


def test_prod_retriever_is_limited_to_its_database_and_collection():
    """None would let a request name any collection the Milvus user can read; [] allows only the default.
    The role in k8s/README.md is granted on this database only (and never Milvus's built-in admin role)."""
    retrieval = prod_retrieval()
    assert retrieval.allowed_collections == []
    assert retrieval.db_name == "mmrag"
    readme = (K8S / "README.md").read_text()
    assert f'db_name="{retrieval.db_name}"' in readme
    assert not re.search(r"grant_role\([^)]*\"admin\"", readme), "mmrag's user must not get Milvus's admin role"


def test_milvus_token_comes_from_the_secret_env(monkeypatch):
    monkeypatch.setenv("MMRAG_MILVUS_TOKEN", "mmrag:from-secret")
    retrieval = prod_retrieval()
    resolved = getattr(retrieval, "resolved_token", lambda: retrieval.token)()
    assert resolved == "mmrag:from-secret"


# ---- against the chart's own source (skipped without it: tests/k8s/milvus_chart.py) ----------------------------


def test_chart_is_the_pinned_version():
    chart = yaml.safe_load(milvus_chart.chart_file("Chart.yaml"))
    assert chart["version"] == milvus_chart.CHART_VERSION
    for mode, path in milvus_chart.VALUES_FILES.items():
        assert milvus_chart.our_values(mode)["image"]["all"]["tag"] == f"v{chart['appVersion']}", mode
        assert f"--version {milvus_chart.CHART_VERSION}" in path.read_text(), mode
    assert f"--version {milvus_chart.CHART_VERSION}" in (K8S / "README.md").read_text()


def test_chart_writes_minio_keys_from_values_and_minio_reads_the_secret():
    """Why the environment variables exist: if a chart release starts reading existingSecret for Milvus, this
    fails, and the extraEnv blocks can go."""
    block = milvus_chart.config_tpl_block("minio")
    assert re.search(r"^\s+accessKeyID: \{\{ \.Values\.minio\.accessKey \}\}$", block, re.M)
    assert re.search(r"^\s+secretAccessKey: \{\{ \.Values\.minio\.secretKey \}\}$", block, re.M)
    for template in (milvus_chart.chart_dir() / "templates").iterdir():
        assert "existingSecret" not in template.read_text(), template.name
    statefulset = milvus_chart.subchart_file("minio", "templates/statefulset.yaml")
    for key in SECRET_KEYS.values():
        assert f"key: {key}" in statefulset, f"MinIO does not read {key} from its Secret"


def test_env_names_match_the_charts_config_keys():
    keys = re.findall(
        r"^\s+(\w+): \{\{ \.Values\.minio\.(?:accessKey|secretKey) \}\}$", milvus_chart.config_tpl_block("minio"), re.M
    )
    assert sorted(keys) == sorted(MINIO_ENV.values())
    for name, key in MINIO_ENV.items():
        assert milvus_env_key(name) == milvus_env_key(f"minio.{key}")


@pytest.mark.parametrize("mode", MODES)
def test_the_components_the_chart_deploys_are_the_ones_given_the_keys(mode):
    assert set(milvus_chart.deployed_components(mode).values()) == COMPONENTS[mode]


@pytest.mark.parametrize("mode", MODES)
def test_only_etcd_and_minio_subcharts_are_installed(mode):
    assert milvus_chart.enabled_dependencies(mode) == {"etcd", "minio"}
    values = milvus_chart.chart_values(mode)
    if mode == "cluster":
        # config.tpl writes mq.type woodpecker for woodpecker.enabled; embedded (no Woodpecker pods) unless
        # streaming.woodpecker.embedded is false.
        assert "type: woodpecker" in milvus_chart.chart_file("templates/config.tpl")
        assert values["woodpecker"]["enabled"] and values["streaming"]["woodpecker"]["embedded"]
    else:
        assert values["standalone"]["messageQueue"] == "woodpecker"


def _unknown_keys(ours, chart, path=""):
    """Keys we set that the chart's values do not have (a typo or a key of another chart version does nothing)."""
    if not isinstance(ours, dict) or not isinstance(chart, dict) or not chart:
        return []  # a leaf, a list (extraEnv) or a free-form map ({} like resources) takes anything
    found = []
    for key, value in ours.items():
        where = f"{path}.{key}" if path else key
        if key not in chart:
            found.append(where)
        else:
            found += _unknown_keys(value, chart[key], where)
    return found


@pytest.mark.parametrize("mode", MODES)
def test_every_key_we_set_is_a_chart_value(mode):
    chart = yaml.safe_load(milvus_chart.chart_file("values.yaml"))
    for sub in ("minio", "etcd"):
        chart[sub] = milvus_chart.merged(yaml.safe_load(milvus_chart.subchart_file(sub, "values.yaml")), chart[sub])
    ours = milvus_chart.our_values(mode)
    ours["extraConfigFiles"] = {}  # file contents, checked above
    assert not _unknown_keys(ours, chart)
    deployed = set(milvus_chart.deployed_components(mode).values())
    for key, value in ours.items():
        if isinstance(value, dict) and "extraEnv" in (chart.get(key) or {}) and key != "woodpecker":
            assert key in deployed, f"{key} is sized here but the chart does not deploy it in {mode} mode"
