"""The package layout stays a plan, checked on the source with :mod:`ast` (one import
graph, two kinds of rule):

* the protocol layers stay apart (COMMON.md "Layers"): ``iscsi/`` imports nothing of
  ``scsi/`` (the server injects what a connection needs, ``server/fabric.py``),
  ``scsi/`` only ``storage/``, ``storage/`` nothing (:data:`LAYERS`);
* inside a package: no import circle between its modules and no private name
  (``_foo``) taken from another module, and no module over 800 lines.

Every import is counted: at module level, inside functions and under
``if TYPE_CHECKING:`` (an import moved into a function or behind a type check still
ties two modules together). A package's sub-packages count as its modules (``vm/``'s
wings: a circle between two wings is a circle of ``vm/``). Private attributes read off
an object (``manager._locked``) are not seen: only those imported or read off a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "iscsi_vmtarget"
#: The packages held to the plan: every one.
PACKAGES = ["iscsi", "scsi", "storage", "server", "cli", "vm"]

#: Top-level modules with no dependencies of their own, usable by every layer.
LEAVES = {"buffers", "errors", "sizes"}
#: Each protocol layer and the sibling packages it may import from.
LAYERS: dict[str, set[str]] = {
    "iscsi": set(),  # the server injects what it needs of scsi/ (server/fabric.py)
    "scsi": {"storage"},
    "storage": set(),
}

Modules = dict[str, Path]


def _modules(root: Path = ROOT) -> Modules:
    """Every module under ``root`` (a package directory), by dotted name."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str, modules: Modules = MODULES) -> Iterator[tuple[str, str, ast.AST]]:
    """``(module, imported name or "", node)`` for every import of module ``name``:
    ``from pkg import mod`` names the module ``pkg.mod`` when there is one."""
    path = modules[name]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, path, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    yield sub, "", node
                else:
                    yield source, alias.name, node


def _in_package(package: str, modules: Modules = MODULES) -> list[str]:
    prefix = f"iscsi_vmtarget.{package}"
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def _graph(package: str) -> dict[str, set[str]]:
    """The imports between the modules of one package (its ``__init__`` left out)."""
    own = _in_package(package)
    prefix = f"iscsi_vmtarget.{package}"
    return {m: {t for t, _, _ in _imports(m) if t in own and t != m and t != prefix} for m in own}


def _layer_offenders(layer: str, modules: Modules = MODULES) -> list[str]:
    """``"module imports pkg/"`` for every import of a package ``layer`` may not use."""
    allowed = LAYERS.get(layer, set()) | LEAVES | {layer}
    offenders = set()
    for name in _in_package(layer, modules):
        for target, imported, _ in _imports(name, modules):
            # "from .. import server" names a package even where none is on disk (a test).
            parts = target.split(".") + (
                [imported] if target == "iscsi_vmtarget" and imported else []
            )
            if parts[0] == "iscsi_vmtarget" and len(parts) > 1 and parts[1] not in allowed:
                offenders.add(f"{name} imports {parts[1]}/")
    return sorted(offenders)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package: str) -> None:
    graph = _graph(package)
    assert graph, f"no modules found for {package}"
    circles = _circles(graph)
    assert not circles, "import circles:\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
        for c in circles
    )


def _private_uses(name: str, modules: Modules = MODULES) -> Iterator[str]:
    """Private names module ``name`` takes from other modules of the product: imported
    (``from .x import _y``) or read off an imported module (``x._y``)."""
    path = modules[name]
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    for target, imported, node in _imports(name, modules):
        if not target.startswith("iscsi_vmtarget"):
            continue
        if imported.startswith("_") and not imported.startswith("__"):
            yield f"{name}:{node.lineno} imports {target}.{imported}"
        assert isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names:
            if not imported and target.endswith(alias.name.split(".")[-1]):
                aliases[alias.asname or alias.name.split(".")[0]] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_across_modules(package: str) -> None:
    uses = [u for m in _graph(package) for u in _private_uses(m)]
    assert not uses, "private names taken from other modules:\n" + "\n".join(uses)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_800_lines(package: str) -> None:
    long = [
        f"{m}: {n} lines"
        for m in _graph(package)
        if (n := len(MODULES[m].read_text().splitlines())) > 800
    ]
    assert not long, "modules over 800 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_only_what_lies_below(layer: str) -> None:
    assert _in_package(layer), f"no modules found for {layer}"
    offenders = _layer_offenders(layer)
    assert not offenders, "imports across the layers:\n" + "\n".join(offenders)


def _testing_users(modules: Modules = MODULES) -> list[str]:
    """Modules of the product, outside ``testing/`` itself, that import ``testing/``."""
    testing = "iscsi_vmtarget.testing"
    return sorted(
        f"{name} imports {target}"
        for name in modules
        if name != testing and not name.startswith(testing + ".")
        for target, _, _ in _imports(name, modules)
        if target == testing or target.startswith(testing + ".")
    )


def test_the_target_never_imports_testing() -> None:
    """``testing/`` is shipped for tools/ and tests/ (README "Tools"), never used by the
    target: no product module outside it imports it."""
    users = _testing_users()
    assert not users, "the product imports its test harnesses:\n" + "\n".join(users)


def test_the_graph_sees_a_circle() -> None:
    """The checks can fail: a two-module circle is found, a chain is not."""
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_walker_sees_every_import(tmp_path: Path) -> None:
    """The checks can fail: relative, absolute, in-function and TYPE_CHECKING imports of
    another layer are found, and so are private names imported or read off a module."""
    iscsi = tmp_path / "iscsi_vmtarget" / "iscsi"
    iscsi.mkdir(parents=True)
    for name in ("__init__", "pdu"):
        (iscsi / f"{name}.py").write_text("_SECRET = 1\n")
    (iscsi / "fake.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..scsi.task import X\n"
        "import iscsi_vmtarget.vm.units.unit\n"
        "def f():\n    from .. import server\n"
        "from . import pdu\n"
        "from .pdu import _SECRET\n"
        "print(pdu._SECRET)\n"
    )
    modules = _modules(tmp_path / "iscsi_vmtarget")
    assert _layer_offenders("iscsi", modules) == [
        f"iscsi_vmtarget.iscsi.fake imports {pkg}/" for pkg in ("scsi", "server", "vm")
    ]
    assert [u.split(" ", 1)[1] for u in _private_uses("iscsi_vmtarget.iscsi.fake", modules)] == [
        "imports iscsi_vmtarget.iscsi.pdu._SECRET",
        "uses iscsi_vmtarget.iscsi.pdu._SECRET",
    ]
    assert _testing_users(modules) == []
    (iscsi / "pdu.py").write_text("from ..testing.core import wire\n")
    assert _testing_users(modules) == [
        "iscsi_vmtarget.iscsi.pdu imports iscsi_vmtarget.testing.core"
    ]
