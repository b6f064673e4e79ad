"""The package's shape, read from its imports (Python's ``ast``, nothing imported): layers point one way
and no module imports itself back through others.

Layers, low to high (a module may import its own layer and those below; ``TYPE_CHECKING`` imports count):

0. ``kernels`` (tensor algorithms, the compression methods, the reference engine);
1. what every serving module shares: config, errors, paths, logs;
2. the stages: engine, retrieval, xRAG, the vLLM plugin, images, models, the OpenAI schema and responses;
3. the chat pipeline;
4. its adapters: the HTTP app and batch;
5. the Ray Serve deployments;
6. tools over all of it: the CLI, benchmarks, training.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "serving", "deployments", "training", "benchmarks")

LAYERS = {
    "mmrag.kernels": 0,
    "mmrag.serving": 1,  # the package itself and anything not named below
    "mmrag.serving.config": 1,
    "mmrag.serving.errors": 1,
    "mmrag.serving.paths": 1,
    "mmrag.serving.logs": 1,
    "mmrag.serving.retrieval.config": 1,
    "mmrag.serving.vector_stores.config": 1,
    "mmrag.serving.engine": 2,
    "mmrag.serving.retrieval": 2,
    "mmrag.serving.vector_stores": 2,
    "mmrag.serving.xrag": 2,
    "mmrag.serving.vllm_plugin": 2,
    "mmrag.serving.media": 2,
    "mmrag.serving.video": 2,
    "mmrag.serving.metrics": 2,
    "mmrag.serving.models": 2,
    "mmrag.serving.models.registry": 1,  # names and import paths: the config validates model.name
    "mmrag.serving.openai": 2,
    "mmrag.serving.pipeline": 3,
    "mmrag.serving.openai.server": 4,
    "mmrag.serving.openai.responses_api": 4,  # HTTP adapters over the pipeline, mounted by the server
    "mmrag.serving.openai.completions_api": 4,
    "mmrag.serving.openai.embeddings_api": 4,
    "mmrag.serving.batch": 4,
    "mmrag.serving.server_process": 4,
    "mmrag.deployments": 5,
    "mmrag.serving.cli": 6,
    "mmrag.benchmarks": 6,
    "mmrag.training": 6,
}


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer: add it to LAYERS"
    return LAYERS[max(prefixes, key=len)]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("mmrag", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imports_of(path: Path) -> set[str]:
    """Every ``mmrag.*`` module the file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mmrag.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmrag."):
            found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    graph = {module_name(p): imports_of(p) for p in files}
    # ``from mmrag.x import y`` may name a module y or an attribute of x: keep whichever exists.
    return {
        m: {i for i in targets if i in graph} | {i for i in targets if i not in graph} for m, targets in graph.items()
    }


def test_layers_point_one_way() -> None:
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph or target == module:
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The graph reader finds lazy imports, and the layer rule flags an upward one."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from mmrag.deployments.app import build_app\n")
    assert imports_of(source) == {"mmrag.deployments.app"}
    assert layer("mmrag.deployments.app") > layer("mmrag.serving.batch.chain")
