"""Each suite imports only itself and tests/support, so any one of them runs on its own.

The shared drivers (a sidecar process, Matrix signing, raw socket exchanges) once lived
inside tests/integration, tests/e2e and tests/fuzz, and five suites reached into them;
this keeps them in tests/support.
"""

from __future__ import annotations

import ast
import sys
from importlib.machinery import PathFinder
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = "support"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name `path` imports, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "tests":  # `from tests import fuzz`
                found.extend((node.lineno, f"tests.{alias.name}") for alias in node.names)
    return found


def crossings(root: Path = TESTS) -> list[str]:
    """Imports under `root` (a tests/ tree) of another suite than the importer's own."""
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        own = relative.parts[0] if len(relative.parts) > 1 else None
        allowed = {SHARED} if own == SHARED else {SHARED, own}
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "tests" or len(parts) < 2:
                continue
            if parts[1] not in allowed and (root / parts[1]).is_dir():
                bad.append(f"tests/{relative}:{line} imports {module}")
    return bad


def test_suites_import_only_themselves_and_tests_support() -> None:
    assert crossings() == []


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The empty list above means something only if each form of crossing is caught."""
    for suite in ("e2e", "fuzz", "integration", "support", "unit"):
        (tmp_path / suite).mkdir()
    (tmp_path / "unit" / "a.py").write_text("from tests.e2e.federation import SigningKey\n")
    (tmp_path / "support" / "b.py").write_text("import tests.integration.conftest\n")
    (tmp_path / "fuzz" / "c.py").write_text(
        "from tests import unit\nfrom tests.fuzz import profiles\nfrom tests.support import x\n"
    )
    assert crossings(tmp_path) == [
        "tests/fuzz/c.py:1 imports tests.unit",
        "tests/support/b.py:1 imports tests.integration.conftest",
        "tests/unit/a.py:1 imports tests.e2e.federation",
    ]


def test_no_support_module_shadows_an_installed_module() -> None:
    """mitmdump puts a script's own directory first on sys.path (tests/support/faulty_addon.py
    runs that way), so a support module named like a package (`sidecar.py`) would replace
    that package inside the proxy."""
    support = TESTS / SHARED
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != support]
    modules = [path for path in sorted(support.glob("*.py")) if path.stem != "__init__"]
    shadowing = [path.name for path in modules if PathFinder.find_spec(path.stem, elsewhere)]
    assert shadowing == []
