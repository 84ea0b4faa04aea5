"""The source's shape: imports only point down the layers, and no function is over 50 lines.

Read with `ast` from the files under `src/` (every import, also those under TYPE_CHECKING
and inside functions), so what is checked is what is written, not what happens to be
imported at run time. The generated `_wire/` is neither layered above anything nor held
to the length rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "junjo_backend"
SOURCE = Path(__file__).resolve().parents[2] / "src" / PACKAGE
MAX_FUNCTION_LINES = 50

# Each unit's layer: a module may import its own unit and units of lower layers only.
# Units not named here are core (layer 0): settings, database, logs, _wire, ... The span
# API's routes and the store's wiring (which store the settings pick) stand beside the
# metrics collector: above the store they read or build, below app.
LAYERS = {
    "ingestion": 1,
    "auth": 2,
    "poller": 2,
    "store": 2,
    "metrics": 3,
    "span_api": 3,
    "store_wiring": 3,
    "app": 4,
    "cli": 5,
    "__main__": 6,
}


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement: who imports which module, and where."""

    importer: str
    imported: str
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module `name` is (or lies in), or None when it is not ours."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(root: Path) -> list[Import]:
    """Every import of one of the package's own modules, by any module of the package."""
    known = _modules(root)
    found: list[Import] = []
    for importer, path in known.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from a import b` imports the module a.b when there is one.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                imported = _resolve(target, known)
                if imported is not None and imported != importer:
                    found.append(Import(importer, imported, node.lineno))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def unit_of(module: str) -> str:
    """The layer unit of a package module: its sub-package, or `app`, `metrics`; else core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports of a unit on the same layer or above (the importer's own unit aside)."""
    bad = []
    for imp in imports:
        here, there = unit_of(imp.importer), unit_of(imp.imported)
        if here != there and LAYERS.get(there, 0) >= LAYERS.get(here, 0):
            bad.append(f"{imp.importer}:{imp.line} imports {imp.imported} ({here} -> {there})")
    return bad


def reachable_from(unit: str, imports: list[Import]) -> dict[str, list[str]]:
    """Every module reachable by imports from the modules of `unit`, with one path to each."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.importer, set()).add(imp.imported)
    paths = {m: [m] for m in {i.importer for i in imports} if unit_of(m) == unit}
    todo = list(paths)
    while todo:
        module = todo.pop()
        for nxt in sorted(edges.get(module, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[module], nxt]
                todo.append(nxt)
    return paths


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (methods, nested ones too) longer than `limit` lines, `def` to the body's end."""
    too_long = []
    for module, path in _modules(root).items():
        if "_wire" in module.split("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long.append(f"{module}:{node.lineno} {node.name}: {lines} lines")
    return too_long


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = imports_of(SOURCE)
    assert len(found) > 50, "the reader saw almost no imports"
    return found


def test_the_four_sub_packages_exist() -> None:
    for unit in ("auth", "ingestion", "poller", "cli"):
        assert (SOURCE / unit / "__init__.py").is_file(), unit


def test_imports_only_point_down(imports: list[Import]) -> None:
    assert upward_imports(imports) == []


def test_auth_reaches_the_poller_by_no_path(imports: list[Import]) -> None:
    reached = reachable_from("auth", imports)
    assert {m for m in reached if unit_of(m) == "auth"}, "no auth module was read"
    paths = [" -> ".join(path) for m, path in reached.items() if unit_of(m) == "poller"]
    assert paths == []


def test_no_function_is_over_50_lines() -> None:
    assert long_functions(SOURCE) == []


# The checks judge what they are shown: each is shown a tree with one fault and must see it.


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


_LAYERED = {
    "__init__.py": "",
    "settings.py": "",
    "auth/__init__.py": "",
    "auth/server.py": "from junjo_backend.settings import Settings\n",
    "poller/__init__.py": "",
    "poller/loop.py": "from junjo_backend import settings\n",
    "metrics.py": "from junjo_backend.poller.loop import SpanPoller\n",
}


def test_the_checks_pass_a_layered_tree(tmp_path: Path) -> None:
    found = imports_of(_tree(tmp_path, _LAYERED))
    assert upward_imports(found) == []
    assert all(unit_of(m) != "poller" for m in reachable_from("auth", found))


def test_an_upward_import_under_type_checking_is_seen(tmp_path: Path) -> None:
    bad = _LAYERED | {
        "settings.py": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from junjo_backend.auth.server import X\n"
    }
    assert upward_imports(imports_of(_tree(tmp_path, bad))) == [
        "junjo_backend.settings:3 imports junjo_backend.auth.server (core -> auth)"
    ]


def test_an_indirect_path_from_auth_to_the_poller_is_seen(tmp_path: Path) -> None:
    # auth -> metrics is upward too; the path check names the whole path besides.
    bad = _LAYERED | {"auth/server.py": "from junjo_backend import metrics\n"}
    found = imports_of(_tree(tmp_path, bad))
    reached = reachable_from("auth", found)
    assert reached["junjo_backend.poller.loop"] == [
        "junjo_backend.auth.server",
        "junjo_backend.metrics",
        "junjo_backend.poller.loop",
    ]


def test_a_relative_import_of_a_sibling_layer_is_seen(tmp_path: Path) -> None:
    bad = _LAYERED | {"auth/server.py": "def f():\n    from ..poller import loop\n"}
    assert upward_imports(imports_of(_tree(tmp_path, bad))) == [
        "junjo_backend.auth.server:2 imports junjo_backend.poller.loop (auth -> poller)"
    ]


def test_a_long_function_is_seen_outside_wire_only(tmp_path: Path) -> None:
    def body(indent: str, lines: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))

    most = MAX_FUNCTION_LINES - 1  # body lines that, with the `def` line, just fit
    root = _tree(
        tmp_path,
        {
            "ok.py": "def fits():\n" + body("    ", most),
            "long.py": "class C:\n    def long(self):\n" + body("        ", most + 1),
            "_wire/gen.py": "def generated():\n" + body("    ", most + 1),
        },
    )
    assert long_functions(root) == [f"junjo_backend.long:2 long: {MAX_FUNCTION_LINES + 1} lines"]
