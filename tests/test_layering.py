"""docs/DESIGN.md's map of the packages is the code's: every import inside pmss_dist points down
the table (to a package listed below its own), never up, so the sentence that says so is true;
and within a package no import runs back up to a module that imports it (a family module to the
family table), at the top of a file or inside a function."""

from __future__ import annotations

import ast
import re

from conftest import REPO

SRC = REPO / "src" / "pmss_dist"


def map_order() -> list[str]:
    """The packages of DESIGN.md's map, top to bottom (``cli/`` -> ``cli``, ``files.py`` -> ``files``)."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    section = text.split("## Map of the packages", 1)[1].split("\n## ", 1)[0]
    return [name.removesuffix("/").removesuffix(".py") for name in re.findall(r"^\| `([a-z_]+(?:/|\.py))` \|", section, re.M)]


def imports() -> list[tuple[str, int, str, str]]:
    """(file, line, its package, the package it imports) for every pmss_dist import."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        unit = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                if module.startswith("pmss_dist."):
                    found.append((str(path.relative_to(SRC)), node.lineno, unit, module.split(".")[1]))
    return found


def test_every_package_is_on_the_map():
    order = map_order()
    units = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.name != "__init__.py"
             and (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert set(order) == units and len(order) == len(set(order))


def test_imports_point_down_the_map():
    rank = {unit: i for i, unit in enumerate(map_order())}
    upward = [f"{file}:{line}: {unit} imports {target}" for file, line, unit, target in imports()
              if unit in rank and target != unit and rank[target] < rank[unit]]
    assert not upward, "\n".join(upward)


def module_imports() -> dict[str, dict[str, int]]:
    """Each pmss_dist module's imports of pmss_dist modules, at any depth of its code (an import
    inside a function runs as surely as one at the top, only later), as ``{module: line}``:
    ``from pmss_dist.models import qwen2`` imports the submodule, ``... import FAMILIES`` the package."""
    names = {".".join(("pmss_dist", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
             for p in SRC.rglob("*.py")}
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("pmss_dist", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        found[module] = edges = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in names:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            else:
                targets = [a.name for a in node.names if a.name in names] if isinstance(node, ast.Import) else []
            for target in targets:
                edges.setdefault(target, node.lineno)
    return found


def test_no_import_runs_back_up():
    """No module imports one that imports it back, directly or through others (a family module
    importing ``pmss_dist.models``, whose table imports the families): such a cycle only works while
    one side imports lazily, and puts a module above and below another at once."""
    graph = module_imports()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target, line in graph.get(module, {}).items():
            if target == path[0]:
                cycles.append(" -> ".join(path + [target]) + f" (line {line} of {module})")
            elif target not in path and target > path[0]:  # each cycle once, from its smallest module
                visit(target, path + [target])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, "\n".join(cycles)
