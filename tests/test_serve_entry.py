"""`serve_entry.py`: the API key comes in through a pipe and reaches the program's argv in memory only, never a
command line or the environment, for a script, for a module, and for a multiprocessing spawn child (lmdeploy's
engine process); the program sees what `python SCRIPT` / `python -m MOD` would have shown it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tuichat.server.profiles import SERVE_ENTRY

KEY = "tuichat-s3cret-entry-key"

# Reports what the program saw: its argv, stdin, the start of sys.path, and its own /proc command line.
REPORT = """
import json, os, sys
out = {
    "argv": sys.argv,
    "stdin": sys.stdin.read(),
    "path0": sys.path[0],
    "cmdline": open("/proc/self/cmdline", "rb").read().decode(),
    "environ": open("/proc/self/environ", "rb").read().decode(errors="replace"),
}
print(json.dumps(out))
"""


def _entry(*args: str, key: str | None = KEY, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SERVE_ENTRY), *args],
        input=None if key is None else key + "\n",
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


def test_script_gets_the_key_in_argv_but_not_in_its_command_line(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(REPORT)
    done = _entry("--key-fd", "0", "--script", str(script), "--", "serve", "api_server", "m")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == [str(script), "serve", "api_server", "m", "--api-keys", KEY]
    assert seen["stdin"] == ""  # the key pipe is gone: the program reads /dev/null, as before
    assert seen["path0"] == str(tmp_path)  # like `python prog.py`, not tuichat's package folder
    assert KEY not in seen["cmdline"] and KEY not in seen["environ"]


def test_module_runs_like_python_dash_m(tmp_path: Path) -> None:
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "__main__.py").write_text(REPORT)
    done = _entry("--key-fd", "0", "--module", "fakepkg", "--", "serve", "api_server", "m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == [str(tmp_path / "fakepkg" / "__main__.py"), "serve", "api_server", "m", "--api-keys", KEY]
    assert seen["path0"] == str(tmp_path)
    assert KEY not in seen["cmdline"] and KEY not in seen["environ"]


def test_spawned_child_process_gets_argv_through_the_pipe_not_its_command_line(tmp_path: Path) -> None:
    # lmdeploy's PyTorch engine is a multiprocessing spawn child of the server: its arguments travel pickled.
    pkg = tmp_path / "spawner"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work.py").write_text(
        textwrap.dedent(
            """
            import sys
            def child(path):
                with open(path, "w") as fh:
                    fh.write(repr(sys.argv) + "\\n" + open("/proc/self/cmdline", "rb").read().decode())
            """
        )
    )
    (pkg / "__main__.py").write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys
            from spawner.work import child
            if __name__ == "__main__":
                p = multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1],))
                p.start()
                p.join()
                sys.exit(p.exitcode)
            """
        )
    )
    report = tmp_path / "child.txt"
    done = _entry("--key-fd", "0", "--module", "spawner", "--", str(report), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    child_argv, child_cmdline = report.read_text().split("\n", 1)
    assert KEY in child_argv  # the child got the same sys.argv ...
    assert "--multiprocessing-fork" in child_cmdline and KEY not in child_cmdline  # ... but not on its command line


def test_missing_module_is_reported_in_pythons_own_words(tmp_path: Path) -> None:
    done = _entry("--key-fd", "0", "--module", "no_such_lmdeploy_here", "--", "serve", cwd=tmp_path)
    assert done.returncode == 1
    assert "No module named no_such_lmdeploy_here" in done.stderr
    assert "Traceback" not in done.stderr and KEY not in done.stderr


def test_no_key_or_bad_arguments_exit_2_without_running_anything(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text("print('ran')\n")
    empty = _entry("--key-fd", "0", "--script", str(script), "--", "x", key="")
    assert empty.returncode == 2 and "no API key" in empty.stderr and "ran" not in empty.stdout
    for args in (["--script"], ["--key-fd", "x", "--script", str(script)], ["--", "x"]):
        done = _entry(*args)
        assert done.returncode == 2 and "usage:" in done.stderr, args
