"""`tuichat serve / ps / stop / logs / profiles / doctor` run in-process against the stand-in lmdeploy."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from fakegpu import FakeGpuReader
from standin.harness import STANDIN_COMMAND, free_port, pid_alive

from tuichat.cli import server as servercli
from tuichat.server import launcher
from tuichat.server.gpu import GpuInfo
from tuichat.server.launcher import ServerManager

GIB = 1 << 30


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuichat")
    servercli.add_subcommands(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def cli(*argv: str) -> int:
    return servercli.run(_parse(*argv))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    gpu = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GIB, mem_total=140 * GIB)])
    monkeypatch.setattr(launcher, "make_gpu_reader", lambda: gpu)
    profiles = {
        "fast": {"model": "internlm/internlm2-chat-1_8b", "command": STANDIN_COMMAND, "port": free_port()},
        "other": {
            "model": "internlm/internlm2-chat-1_8b",
            "command": STANDIN_COMMAND,
            "port": free_port(),
            "extra_args": ["--fake-load-seconds", "0.5"],
        },
        "broken": {
            "model": "internlm/internlm2-chat-1_8b",
            "command": STANDIN_COMMAND,
            "port": free_port(),
            "extra_args": ["--fake-crash-while-loading"],
        },
    }
    (tmp_path / "config.toml").write_text(tomli_w.dumps({"default_profile": "fast", "profiles": profiles}))
    yield tmp_path
    mgr = ServerManager()
    for server in mgr.running():
        mgr.stop(server, timeout=1.0)


def test_serve_detach_ps_logs_stop(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("serve", "--detach") == 0
    out = capsys.readouterr()
    assert "fast is ready at http://127.0.0.1:" in out.out
    key = (home / "state" / "servers" / "fast.key").read_text().strip()
    assert key not in out.out + out.err

    assert cli("serve", "other", "--detach") == 0
    capsys.readouterr()

    assert cli("ps") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["PROFILE", "MODEL", "PORT", "PID", "STATE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"fast", "other"}
    assert rows["fast"][4] == "ready"
    assert key not in "\n".join(table)

    assert cli("logs", "fast", "-n", "5") == 0
    logs = capsys.readouterr().out
    assert logs.strip() and key not in logs

    assert cli("stop") == 2  # two running: which one?
    assert "--all" in capsys.readouterr().err
    assert cli("stop", "fast") == 0
    assert "fast stopped" in capsys.readouterr().out
    assert cli("stop", "--all") == 0
    assert cli("ps") == 0
    assert "No server" in capsys.readouterr().out


def test_serve_detach_failure_exits_non_zero_with_reason(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("serve", "broken", "--detach") == 1
    err = capsys.readouterr().err
    assert "exited with code 1 while loading" in err
    assert "GPU ran out of memory" in err
    assert "Last lines of" in err
    assert cli("logs", "broken") == 0  # the failed run's log stays readable
    assert "out of memory" in capsys.readouterr().out.lower()


def test_unknown_profile_and_stop_of_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("serve", "fsat", "--detach") == 1
    assert "Did you mean fast?" in capsys.readouterr().err
    assert cli("stop", "fast") == 1
    assert "No server for profile fast" in capsys.readouterr().err
    assert cli("logs", "never") == 1


def test_profiles_lists_builtins_and_config_with_its_path(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("profiles") == 0
    out = capsys.readouterr().out
    assert str(home / "config.toml") in out
    assert "* fast" in out
    assert "internlm2-w4" in out and "built-in" in out


def test_bad_profile_in_config_names_file_and_key(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "config.toml").write_text('[profiles.x]\nmodel = "a/b"\ntp = "two"\n')
    assert cli("profiles") == 1
    err = capsys.readouterr().err
    assert str(home / "config.toml") in err and "profiles.x.tp" in err


def test_doctor_reports_versions_gpus_and_paths(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli("doctor")
    out = capsys.readouterr().out
    assert "lmdeploy" in out
    assert "GPU 0" in out and "Fake H200" in out and "free of" in out
    assert str(home / "config.toml") in out and str(home / "state") in out
    assert "lmdeploy 0.18.0" in out  # the stand-in profile's command answers --version


def _tuichat(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-m", "tuichat", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


# Ctrl+C, and a plain `kill`: both must stop the server a foreground serve owns. The test passes whether or not
# pytest itself runs with SIGINT ignored (a shell's background job, whose children inherit that).
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_foreground_serve_stops_its_server_on_ctrl_c(home: Path, sig: signal.Signals) -> None:
    serve = _tuichat("serve", "fast")
    try:
        assert serve.stdout is not None
        assert "fast is ready" in serve.stdout.readline()
        server = ServerManager().find("fast")
        assert server is not None
        members = server.pids()
        serve.send_signal(sig)
        assert serve.wait(timeout=15) == 0
        assert serve.stderr is not None and "fast stopped after SIGINT" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not any(pid_alive(p) for p in members)
    assert ServerManager().running() == []


def test_doctor_and_serve_agree_on_the_default_profile(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(home))  # where ~/models/... is looked for
    (home / "config.toml").write_text("")  # no default_profile: the built-in default applies
    cli("doctor")
    out = capsys.readouterr().out
    assert "default   profile internlm2-turbomind" in out
    # the W4 built-in's model is the user's own quantize: doctor says how to make it
    assert "internlm2-w4: its model ~/models/internlm2-chat-1_8b-w4a16 is not made yet" in out
    assert "run `tuichat quantize internlm/internlm2-chat-1_8b --out ~/models/" in out
    assert cli("serve", "--detach") == 1  # no lmdeploy in the test venv: refused before anything starts
    err = capsys.readouterr().err
    assert "Cannot start internlm2-turbomind: lmdeploy is not installed" in err
    assert cli("profiles") == 0
    assert "* internlm2-turbomind" in capsys.readouterr().out


def test_logs_follow_shows_new_lines_until_the_server_stops(home: Path) -> None:
    assert cli("serve", "fast", "--detach") == 0
    follow = _tuichat("logs", "fast", "--follow", "-n", "1")
    try:
        mgr = ServerManager()
        server = mgr.find("fast")
        assert server is not None and follow.stdout is not None
        assert follow.stdout.readline().strip()  # the tail is out: it follows from here
        mgr.stop(server)
        out, err = follow.communicate(timeout=15)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0
    assert "Finished server process" in out
    assert "no longer running" in err
