"""The backend libraries stay behind keyd/backends/: nothing else imports them.

A module that never imports hvac, pkcs11 or requests cannot catch (or be
written to expect) their exceptions, so each backend must convert them into
keyd errors before they leave it (STYLE "Foreign exceptions stop at the
wrapper"); the backends' own tests prove the conversions.
"""

from __future__ import annotations

import ast
from pathlib import Path

KEYD = Path(__file__).resolve().parent.parent / "keyd"
BACKEND_LIBRARIES = {"hvac", "pkcs11", "requests"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_keyd_backends_imports_hvac_pkcs11_or_requests() -> None:
    outside = {
        str(path.relative_to(KEYD)): sorted(imported_roots(path) & BACKEND_LIBRARIES)
        for path in KEYD.rglob("*.py")
        if "backends" not in path.relative_to(KEYD).parts
    }
    assert {name: libs for name, libs in outside.items() if libs} == {}


def test_each_backend_library_is_imported_by_its_own_backend() -> None:
    """The check above looks at the right names: the backends do import them."""
    inside: set[str] = set()
    for path in (KEYD / "backends").rglob("*.py"):
        inside |= imported_roots(path)
    assert inside >= BACKEND_LIBRARIES
