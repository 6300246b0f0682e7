"""The domain layer must not import Textual, Rich or the UI: it is used by the CLI, benchmarks and tests without a
terminal, and two conversations (compare, batch, browser sessions) need it free of any App.

Every import statement is checked, also those inside functions and `if TYPE_CHECKING:` blocks, by walking each
domain module's syntax tree. The checker itself is tested on sources that break the rule, so it can fail.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

import tuichat

SRC = Path(tuichat.__file__).parent
ROOT = SRC.parent.parent
FORBIDDEN = ("textual", "rich", "tuichat.ui")
# The CLI's entries to the UI, imported lazily inside a function: the chat app (`tuichat`) and `tuichat compare`.
ALLOWED = {("cli.main", "tuichat.ui.app"), ("cli.main", "tuichat.ui.compare_app")}


def domain_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "ui" not in p.relative_to(SRC).parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """Every module an import statement in `source` names, absolute, with its line (relative imports resolved)."""
    package = ["tuichat", *module.split(".")[:-1]]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from tuichat import ui` names the UI package through its alias
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str) -> list[str]:
    bad = []
    for line, name in imported_names(source, module):
        allowed = any(m == module and (name == a or name.startswith(a + ".")) for m, a in ALLOWED)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN) and not allowed:
            bad.append(f"{module}:{line} imports {name}")
    return bad


def test_no_domain_module_imports_textual_rich_or_the_ui_anywhere() -> None:
    bad = [v for path in domain_modules() for v in violations(path.read_text(), module_name(path))]
    assert bad == []


@pytest.mark.parametrize(
    "source",
    [
        "from textual.app import App\n",
        "import textual\n",
        "def f():\n    from textual.widgets import Static\n    return Static\n",
        "class C:\n    def m(self):\n        import rich.text\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from textual.app import App\n",
        "from .ui.app import make_app\n",
        "from . import ui\n",
        "from tuichat.ui import widgets\n",
        "try:\n    import rich\nexcept ImportError:\n    pass\n",
    ],
)
def test_the_checker_catches_every_way_of_importing_textual(source: str) -> None:
    assert violations(source, "config") != []


def test_the_checker_allows_the_cli_entry_and_plain_imports() -> None:
    assert violations("def run():\n    from tuichat.ui.app import make_app\n", "cli.main") == []
    assert violations("import httpx\nfrom .sampling import Sampling\nfrom textualize_x import y\n", "config") == []


def test_a_fresh_interpreter_importing_every_domain_module_loads_no_textual() -> None:
    # The runtime view of the same rule: a third-party package that pulls in Textual is caught here. Rich is left
    # out on purpose: httpx imports it (for its own command line) whenever click is installed, as import-linter does.
    import subprocess

    names = [module_name(p) for p in domain_modules() if p.stem not in ("__main__", "__init__")]
    code = (
        "import sys, importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module('tuichat.' + name)\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'textual')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_linter_contract_covers_every_domain_module() -> None:
    # CI runs `lint-imports`; a module missing from the contract would escape it.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    # import-linter checks a listed package together with everything under it.
    listed = {m for c in contracts for m in c.get("source_modules", [])}
    expected = {"tuichat." + module_name(p) for p in domain_modules() if p.stem not in ("__init__", "__main__", "main")}
    uncovered = {m for m in expected if not any(m == s or m.startswith(s + ".") for s in listed)}
    assert uncovered == set()


MAX_CLASS_LINES = 450  # past this a class holds more than one job: split it (issue 19)


def long_classes(source: str, where: str) -> list[str]:
    return [
        f"{where}:{node.lineno} class {node.name} is {(node.end_lineno or node.lineno) - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_CLASS_LINES
    ]


def test_no_class_in_src_is_longer_than_the_limit() -> None:
    found = [bad for path in sorted(SRC.rglob("*.py")) for bad in long_classes(path.read_text(), str(path))]
    assert not found, "split these classes:\n" + "\n".join(found)


def test_the_class_length_check_catches_a_long_class() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    assert long_classes(f"class Big:\n{body}\n", "big.py") == [f"big.py:1 class Big is {MAX_CLASS_LINES + 1} lines"]
    assert long_classes("class Small:\n    x = 1\n", "small.py") == []
