"""The protocol layers stay apart: ``iscsi/`` -> ``scsi/`` -> ``storage/``, each importing
only what lies below it (COMMON.md "Layers"), checked on the source with ``ast`` so a
stray import anywhere in a module (even under TYPE_CHECKING or in a function) fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "iscsi_vmtarget"

#: Top-level modules with no dependencies of their own, usable by every layer.
LEAVES = {"errors", "sizes"}

#: Each layer and the sibling packages it may import from.
ALLOWED: dict[str, set[str]] = {
    "iscsi": set(),  # the server injects what it needs of scsi/ (server/fabric.py)
    "scsi": {"storage"},
    "storage": set(),
}


def imported_packages(path: Path, package: Path = PACKAGE) -> set[str]:
    """The first component under ``iscsi_vmtarget`` of every import in ``path``."""
    here = path.relative_to(package.parent).with_suffix("").parts  # iscsi_vmtarget, pkg, mod
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(here[: len(here) - node.level]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            # "from .. import x" names x, a module of the package, too.
            names = [module + [alias.name] for alias in node.names] if not node.module else [module]
        else:
            continue
        for parts in names:
            if parts[0] == "iscsi_vmtarget" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_lies_below(layer: str) -> None:
    allowed = ALLOWED[layer] | LEAVES | {layer}
    offenders = {
        f"{path.relative_to(PACKAGE)} imports {pkg}/"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for pkg in imported_packages(path) - allowed
    }
    assert not offenders, sorted(offenders)


def test_the_check_sees_imports(tmp_path: Path) -> None:
    """The walker finds relative, absolute and TYPE_CHECKING imports (so the test can fail)."""
    fake = tmp_path / "iscsi_vmtarget" / "iscsi" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..scsi.task import X\n"
        "import iscsi_vmtarget.vm.unit\n"
        "from .. import server\n"
        "from . import pdu\n"
    )
    assert imported_packages(fake, tmp_path / "iscsi_vmtarget") == {"scsi", "vm", "server", "iscsi"}
