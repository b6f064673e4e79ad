"""Reading the Milvus Helm chart's own source where no Helm binary exists (none installs from PyPI or Debian).

The chart is not kept in the repo. A test that needs it reads the chart directory (or the ``.tgz`` that
``helm pull zilliztech/milvus --version 5.0.19`` writes) named by ``$MMRAG_MILVUS_CHART``, else
``../shared/milvus-helm/charts/milvus``, and is skipped with that reason when neither exists.

It is not a template engine: it evaluates the few chart expressions our checks depend on (the guards at the top
of each component's Deployment, the dependency conditions) over the chart's values merged with ours, the way
Helm merges them, and reads the literal lines of ``config.tpl``.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import K8S, REPO

CHART_VERSION = "5.0.19"
DEFAULT_CHART = REPO.parent / "shared" / "milvus-helm" / "charts" / "milvus"
VALUES_FILES = {
    "cluster": K8S / "milvus" / "values-cluster.yaml",
    "standalone": K8S / "milvus" / "values-standalone.yaml",
}
TLS_VALUES = K8S / "milvus" / "values-tls.yaml"


def our_values(mode: str) -> dict[str, Any]:
    return yaml.safe_load(VALUES_FILES[mode].read_text())


@functools.cache
def chart_dir() -> Path:
    source = Path(os.environ.get("MMRAG_MILVUS_CHART", DEFAULT_CHART))
    if source.is_file() and source.name.endswith((".tgz", ".tar.gz")):
        target = Path(tempfile.mkdtemp(prefix="milvus-chart-"))
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")
        source = target / "milvus"
    if not (source / "Chart.yaml").is_file():
        pytest.skip(
            f"the Milvus chart {CHART_VERSION} is not at {source}: set MMRAG_MILVUS_CHART to its directory or to "
            f"the .tgz of `helm pull zilliztech/milvus --version {CHART_VERSION}`"
        )
    return source


def chart_file(relative: str) -> str:
    return (chart_dir() / relative).read_text()


def merged(base: Any, override: Any) -> Any:
    """Helm's values merge: maps merge key by key, anything else (lists, strings) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merged(base.get(key), value) if key in base else value
        return out
    return override


def chart_values(mode: str) -> dict[str, Any]:
    """The values the chart templates see with our file: the chart's defaults under ours."""
    return merged(yaml.safe_load(chart_file("values.yaml")), our_values(mode))


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def evaluate(expression: str, values: dict[str, Any]) -> bool:
    """A Go-template condition made of ``and``/``or``/``not`` over ``.Values.x.y`` (Helm's truthiness)."""
    words = expression.replace("(", " ").replace(")", " ").split()
    if words[0] in ("and", "or"):
        results = [evaluate(word, values) for word in words[1:]]
        return all(results) if words[0] == "and" else any(results)
    if words[0] == "not":
        return not evaluate(" ".join(words[1:]), values)
    (word,) = words
    assert word.startswith(".Values."), f"not a values reference: {word}"
    return bool(lookup(values, word.removeprefix(".Values.")))


def deployed_components(mode: str) -> dict[str, str]:
    """{template file: values key} of the Milvus Deployments the chart renders with our values.

    A component's template is gated by a top-level ``if`` on ``.Values.cluster.enabled`` (and its own
    ``enabled``); the values key is the one whose ``extraEnv`` the template writes into the container."""
    values = chart_values(mode)
    found = {}
    for template in sorted((chart_dir() / "templates").glob("*-deployment.yaml")):
        text = template.read_text()
        guards = [g for g in re.findall(r"^\{\{-? if (.+?) -?\}\}", text, re.M) if ".Values.cluster.enabled" in g]
        if not guards or not all(evaluate(g, values) for g in guards):
            continue
        (key,) = set(re.findall(r"toYaml \.Values\.(\w+)\.extraEnv", text))
        found[template.name] = key
    return found


def enabled_dependencies(mode: str) -> set[str]:
    """The subcharts Helm installs with our values (requirements.yaml conditions)."""
    values = chart_values(mode)
    deps = yaml.safe_load(chart_file("requirements.yaml"))["dependencies"]
    return {d.get("alias", d["name"]) for d in deps if lookup(values, d["condition"])}


def config_tpl_block(name: str) -> str:
    """The lines of ``config.tpl`` under the top-level key ``name:`` (what goes into milvus.yaml)."""
    text = chart_file("templates/config.tpl")
    match = re.search(rf"^{name}:\n((?:[ {{].*\n|\n)*?)(?=^\w)", text, re.M)
    assert match, f"config.tpl has no top-level {name}: block"
    return match.group(1)


def subchart_file(chart: str, relative: str) -> str:
    """A file of a bundled dependency (charts/<name>-<version>.tgz)."""
    (archive_path,) = (chart_dir() / "charts").glob(f"{chart}-*.tgz")
    with tarfile.open(archive_path) as archive:
        member = archive.extractfile(f"{chart}/{relative}")
        assert member is not None
        return member.read().decode()
