"""The layout holds: no import circle anywhere, the library never imports a command shell or an
argument parser, the model's config needs no JAX and its kernels no Flax, no source file is
long. Imports are read from the source (every `import`, at any depth, TYPE_CHECKING included),
so an import placed inside a function to dodge a circle still counts."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folders -> the installed module name they become (pyproject.toml's package-dir).
PACKAGES = {"jaxtag": "jaxtag", "configs": "jaxtag.configs", "data_prep": "jaxtag.data_prep"}
SHELLS = ("jaxtag.cli", "jaxtag.__main__")  # the command shells; everything else is library
SHELL_LIBRARIES = {"argparse", "absl", "ml_collections.config_flags"}
MAX_LINES = 450
SOURCE_FOLDERS = ("jaxtag", "configs", "data_prep", "bench", "tests")


def module_files() -> dict[str, Path]:
    """Module name -> source file of every module of the installed namespace."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def import_records(text: str) -> list[dict]:
    """Every import statement of a source: kind, level, module, names and whether it is at the
    module's top level."""
    tree = ast.parse(text)
    top = {id(node) for node in tree.body}
    records = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            records.append({
                "from": isinstance(node, ast.ImportFrom),
                "level": getattr(node, "level", 0),
                "module": getattr(node, "module", None),
                "names": [alias.name for alias in node.names],
                "top": id(node) in top,
            })  # fmt: skip
    return records


@functools.cache
def all_records() -> dict[str, list[dict]]:
    """`import_records` of every module, parsed in a fresh interpreter: CPython 3.11's
    `ast.parse` can fail ("AST constructor recursion depth mismatch") in a process where other
    tests ran before."""
    paths = [str(p) for p in module_files().values()]
    done = subprocess.run(
        [sys.executable, __file__, *paths], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def imported_names(
    path: Path, module: str, is_package: bool, modules: dict | None = None
) -> set[str]:
    """Every module name an import statement of `path` names, relative imports resolved.
    `from A import B` names A.B when that is a module of `modules` (a submodule import, as
    `from jaxtag import audio`), else A (B is one of A's attributes)."""
    modules = module_files() if modules is None else modules
    base = module if is_package else module.rpartition(".")[0]
    names = set()
    for record in all_records()[str(path)]:
        if not record["from"]:
            names.update(record["names"])
            continue
        if record["level"]:
            anchor = base.split(".")
            anchor = anchor[: len(anchor) - (record["level"] - 1)]
            source = ".".join([*anchor, *([record["module"]] if record["module"] else [])])
        else:
            source = record["module"]
        for alias in record["names"]:
            sub = f"{source}.{alias}"
            names.add(sub if _installed(sub) in modules else source)
    return {_installed(n) for n in names}


def _installed(name: str) -> str:
    """`data_prep`/`configs` from a clone are the installed jaxtag.data_prep/jaxtag.configs."""
    return "jaxtag." + name if name.split(".")[0] in ("data_prep", "configs") else name


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        found = imported_names(path, name, path.name == "__init__.py", modules)
        graph[name] = {n for n in found if n in modules and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_shell(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SHELLS)


def test_the_walker_sees_imports_inside_functions_and_finds_a_circle():
    graph = import_graph()
    # jaxtag.api imports jaxtag.released inside a function only.
    assert "jaxtag.released" in graph["jaxtag.api"]
    assert "jaxtag.model.kernels" in graph["jaxtag.model.front_end"]
    assert "jaxtag.configs.common" in graph["jaxtag.configs.demo"]  # a relative import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_anywhere():
    assert cycles(import_graph()) == []


def test_the_library_imports_no_command_shell_and_no_argument_parser():
    modules = module_files()
    offenders = []
    for name, path in modules.items():
        if is_shell(name) or name.startswith("jaxtag.data_prep"):
            continue  # data_prep's builders have their own `jaxtag-build` shell
        found = imported_names(path, name, path.name == "__init__.py", modules)
        bad = sorted(n for n in found if is_shell(n) or n.split(".")[0] in SHELL_LIBRARIES)
        bad += sorted(n for n in found if n in SHELL_LIBRARIES)
        if bad:
            offenders.append(f"{name}: {sorted(set(bad))}")
    assert offenders == []


def test_the_library_never_imports_the_dataset_builders():
    graph = import_graph()
    library = [n for n in graph if n.startswith("jaxtag") and not n.startswith("jaxtag.data_prep")]
    assert [n for n in library if any(m.startswith("jaxtag.data_prep") for m in graph[n])] == []


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("jaxtag.model.config", {"jax", "flax", "numpy"}),  # what it computes, not how
        ("jaxtag.model.kernels", {"flax"}),  # pure array functions
        ("jaxtag.errors", {"jax", "numpy"}),
        ("jaxtag", {"jax", "flax", "jaxtag.api"}),  # `import jaxtag` loads the API lazily
    ],
)
def test_light_modules_stay_light(module, forbidden):
    records = all_records()[str(module_files()[module])]
    top_level = set()
    for record in records:  # module level only: imports inside functions run on use
        if record["top"]:
            top_level.update([record["module"]] if record["from"] else record["names"])
    top_level.discard(None)
    assert not {n for n in top_level if n.split(".")[0] in forbidden or n in forbidden}


def test_the_model_package_flows_one_way():
    graph = import_graph()
    order = ["config", "layers", "kernels", "front_end", "encoder", "network", "tuning"]
    for i, name in enumerate(order):
        later = {f"jaxtag.model.{n}" for n in order[i + 1 :]}
        assert not graph[f"jaxtag.model.{name}"] & later, name


def test_no_source_file_is_long():
    long = []
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            lines = path.read_text(encoding="utf-8").count("\n")
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}: {lines}")
    assert long == []


if __name__ == "__main__":  # the parsing half of `all_records`, in its own interpreter
    print(
        json.dumps({p: import_records(Path(p).read_text(encoding="utf-8")) for p in sys.argv[1:]})
    )
