"""The domain layer must not import Textual: it is used by the CLI, benchmarks and tests without a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tuichat

SRC = Path(tuichat.__file__).parent
DOMAIN = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__main__",))


def test_domain_modules_never_import_textual() -> None:
    # A fresh interpreter, so modules imported by other tests cannot hide an import.
    code = (
        "import sys, importlib\n"
        f"for name in {DOMAIN!r}:\n"
        "    importlib.import_module('tuichat.' + name)\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"domain modules pulled in Textual: {out.stdout.strip()}"


def test_the_list_covers_the_core_domain_modules() -> None:
    for name in ("config", "client", "sampling", "store", "gpu", "metrics", "launcher", "chat"):
        assert name in DOMAIN


def test_ui_is_where_textual_lives() -> None:
    text = (SRC / "ui" / "app.py").read_text()
    assert "from textual" in text
