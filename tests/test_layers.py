"""Imports run one way: no module imports a higher layer, and no modules import each other in a
circle (function-level imports included). The layer order is docs/extending.md's (Layout).

Reads the code with `ast` only: nothing is imported.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and those below; a name names a package (all
# of its modules) or one module. The data layer stands alone: it imports nothing of uvit_jax.
LAYERS = [
    ["input_pipeline"],
    [
        "uvit_jax.parallel",
        "uvit_jax.config_defaults",
        "uvit_jax.config_checks",
        "uvit_jax.checkpoints",
        "uvit_jax.errors",
        "uvit_jax.library_logs",
        "uvit_jax.workdir_lock",
        "uvit_jax.images",
        "uvit_jax.conditioning",
    ],
    ["uvit_jax.models", "uvit_jax.diffusion"],
    ["uvit_jax.convert"],
    ["uvit_jax.latent_codec", "uvit_jax.latent_scale", "uvit_jax.text_encoder"],
    ["uvit_jax.sampling", "uvit_jax.train"],
    ["uvit_jax.evaluation"],
    ["uvit_jax.evals"],  # evaluators during training, chosen by config
    ["uvit_jax.aot"],  # compiles the programs of the layers below for absent devices
    ["uvit_jax.api", "uvit_jax"],  # `uvit_jax/__init__.py` hands on the notebook API
    ["uvit_jax.jobs"],
    ["configs", "main"],
]
SOURCES = ["input_pipeline", "uvit_jax", "configs", "main.py"]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
    files = []
    for source in SOURCES:
        path = REPO / source
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return {module_name(f): f for f in files}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                # `from package import module` imports the module, `from module import name`
                # the module.
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & set(modules)


def layer_of(module: str) -> int:
    """The index of the longest LAYERS entry that is `module` or a package above it."""
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = i, len(entry)
    if best is None:
        raise AssertionError(
            f"{module} is in no layer: add it to LAYERS (and the layout in docs/extending.md)"
        )
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_import_runs_down_the_layers(graph):
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n  " + "\n  ".join(upward)


def test_no_import_circle(graph):
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "modules that import each other:\n  " + "\n  ".join(circles)
