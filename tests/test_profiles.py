"""Server profiles: strict validation naming file, profile and key; the built-ins; round trip; lmdeploy argv."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tuichat.errors import ConfigError
from tuichat.server.profiles import (
    BUILTIN_PROFILES,
    DEFAULT_PROFILE_NAME,
    SERVE_ENTRY,
    Profile,
    build_argv,
    build_hidden_key_argv,
    entry_prefix,
    make_model_hint,
    parse_profile,
    profile_to_table,
    validate_name,
)

FILE = "/home/u/.config/tuichat/config.toml"


def _error(table: dict[str, object], name: str = "mine") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_profile(name, table, FILE)
    return info.value


def test_builtins_mirror_the_tutorial_and_name_only_models_that_exist() -> None:
    # the default is the plain tutorial model, and the first profile (where the server screen starts)
    assert next(iter(BUILTIN_PROFILES)) == DEFAULT_PROFILE_NAME
    default = BUILTIN_PROFILES[DEFAULT_PROFILE_NAME]
    assert default.model == "internlm/internlm2-chat-1_8b"
    backends = {p.backend for p in BUILTIN_PROFILES.values() if p.model == "internlm/internlm2-chat-1_8b"}
    assert backends == {"turbomind", "pytorch"}
    # no hub publishes a 4-bit InternLM2-chat-1.8B: the W4 profile serves what the user's own quantize makes
    w4 = BUILTIN_PROFILES["internlm2-w4"]
    assert (w4.model_format, w4.cache_max_entry_count) == ("awq", 0.4)
    assert w4.model.startswith("~/")
    make = make_model_hint(w4.model)
    assert make is not None and make.startswith("tuichat quantize internlm/internlm2-chat-1_8b ")
    assert f"--out {w4.model}" in make
    assert make_model_hint("internlm/internlm2-chat-1_8b") is None


def test_full_profile_parses_into_typed_values() -> None:
    p = parse_profile(
        "big",
        {
            "model": "/data/models/qwen",
            "backend": "pytorch",
            "model_format": "awq",
            "tp": 2,
            "session_len": 8192,
            "max_batch_size": 64,
            "cache_max_entry_count": 0.5,
            "quant_policy": 8,
            "port": 24000,
            "command": ["/opt/env/bin/lmdeploy"],
            "extra_args": ["--cache-block-seq-len", "128"],
            "stop_timeout": 10,
            "max_prefill_token_num": 4096,
            "enable_prefix_caching": True,
            "chat_template": "qwen",
            "model_name": "qwen",
            "log_level": "info",
            "dtype": "bfloat16",
            "server_name": "0.0.0.0",
            "api_key": "fixed-key",
        },
        FILE,
    )
    assert p.tp == 2 and p.port == 24000 and p.stop_timeout == 10.0
    assert p.command == ("/opt/env/bin/lmdeploy",) and p.log_level == "INFO"
    assert not p.binds_loopback_only


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({}, "model", "required"),
        ({"model": "a/b", "cache_max_entry": 0.4}, "cache_max_entry", "cache_max_entry_count"),
        ({"model": "a/b", "backend": "vllm"}, "backend", "'turbomind' or 'pytorch'"),
        ({"model": "a/b", "tp": 0}, "tp", "between 1"),
        ({"model": "a/b", "tp": True}, "tp", "whole number"),
        ({"model": "a/b", "cache_max_entry_count": 1.5}, "cache_max_entry_count", "at most 1"),
        ({"model": "a/b", "cache_max_entry_count": 0}, "cache_max_entry_count", "more than 0"),
        ({"model": "a/b", "quant_policy": 2}, "quant_policy", "0 (none), 4"),
        ({"model": "a/b", "port": "any"}, "port", '"auto"'),
        ({"model": "a/b", "port": 70000}, "port", "65535"),
        ({"model": "a/b", "command": "lmdeploy"}, "command", "list of strings"),
        ({"model": "a/b", "command": []}, "command", "empty"),
        ({"model": "a/b", "extra_args": ["--tp", 2]}, "extra_args", "quotes"),
        ({"model": "a/b", "enable_prefix_caching": "yes"}, "enable_prefix_caching", "true or false"),
        ({"model": "a/b", "dtype": "fp32"}, "dtype", "'bfloat16'"),
        ({"model": "a/b", "stop_timeout": -1}, "stop_timeout", "seconds"),
        ({"model": ""}, "model", "empty"),
        ({"model": "a/b", "api_key": "-starts-like-a-flag"}, "api_key", "start with '-'"),
    ],
)
def test_bad_values_name_file_profile_and_key(table: dict[str, object], key: str, words: str) -> None:
    err = _error(table)
    assert err.file == FILE
    assert err.key == f"profiles.mine.{key}"
    assert words in err.message
    assert FILE in str(err) and f"profiles.mine.{key}" in str(err)


def test_profile_name_must_be_file_safe() -> None:
    assert validate_name("internlm2-w4") == "internlm2-w4"
    for bad in ("../x", "a b", "", "-x", "x" * 65):
        with pytest.raises(ConfigError):
            validate_name(bad)
    err = _error({"model": "a/b"}, name="../etc")
    assert err.file == FILE


def test_table_round_trips_through_toml_with_only_non_defaults() -> None:
    p = Profile(model="a/b", backend="pytorch", extra_args=("--x",), stop_timeout=5.0, port=24001)
    table = profile_to_table(p)
    assert table == {"model": "a/b", "backend": "pytorch", "port": 24001, "extra_args": ["--x"], "stop_timeout": 5}
    again = tomllib.loads(tomli_w.dumps({"profiles": {"p": table}}))["profiles"]["p"]
    assert parse_profile("p", again, FILE) == p
    for name, builtin in BUILTIN_PROFILES.items():
        assert parse_profile(name, profile_to_table(builtin), FILE) == builtin


def test_argv_binds_loopback_with_key_and_flags() -> None:
    p = Profile(
        model="internlm/internlm2-chat-1_8b-4bit",
        model_format="awq",
        cache_max_entry_count=0.4,
        enable_prefix_caching=True,
        extra_args=("--log-level", "INFO"),
    )
    argv = build_argv(p, port=23334, api_key="k3y")
    assert argv[:6] == [sys.executable, "-m", "lmdeploy", "serve", "api_server", p.model]

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert flag("--server-name") == "127.0.0.1"
    assert flag("--server-port") == "23334"
    assert flag("--api-keys") == "k3y"
    assert flag("--model-format") == "awq"
    assert flag("--cache-max-entry-count") == "0.4"
    assert "--enable-prefix-caching" in argv
    assert "--backend" not in argv  # unset settings are left to lmdeploy
    assert argv.index("--log-level") > argv.index("--model-format")


def test_custom_command_and_opted_out_server_name() -> None:
    p = Profile(model="/m", command=("/opt/bin/lmdeploy",), server_name="0.0.0.0", tp=2)
    argv = build_argv(p, port=1, api_key="k")
    assert argv[:3] == ["/opt/bin/lmdeploy", "serve", "api_server"]
    assert argv[argv.index("--server-name") + 1] == "0.0.0.0"
    assert argv[argv.index("--tp") + 1] == "2"


def test_home_relative_model_is_expanded_for_lmdeploy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    p = Profile(model="~/models/m")
    argv = build_argv(p, port=1, api_key="k")
    assert argv[argv.index("api_server") + 1] == str(tmp_path / "models" / "m")  # no shell expands it for us
    assert p.served_model_name() == str(tmp_path / "models" / "m")  # lmdeploy lists the path it was given


def test_api_key_has_a_length_limit() -> None:
    assert _error({"model": "a/b", "api_key": "k" * 1001}).key == "profiles.mine.api_key"
    assert parse_profile("p", {"model": "a/b", "api_key": "k" * 1000}, FILE).api_key == "k" * 1000


# ---------------------------------------------------------------- the key kept off the command line


def test_default_command_runs_lmdeploy_through_the_entry_without_the_key() -> None:
    argv = build_hidden_key_argv(Profile(model="a/b", backend="pytorch"), port=23334)
    assert argv is not None
    head = [sys.executable, str(SERVE_ENTRY), "--key-fd", "0", "--module", "lmdeploy", "--"]
    assert argv[: len(head)] == head
    assert argv[len(head) : len(head) + 3] == ["serve", "api_server", "a/b"]
    assert "--api-keys" not in argv and argv[argv.index("--backend") + 1] == "pytorch"


def _script(path: Path, first_line: str) -> str:
    path.write_text(f"{first_line}\nimport sys\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["/opt/env/bin/python3.12", "-m", "lmdeploy"], ["/opt/env/bin/python3.12", "ENTRY", "--module", "lmdeploy"]),
        (
            ["python3", "-u", "-X", "dev", "-m", "lmdeploy"],
            ["python3", "-u", "-X", "dev", "ENTRY", "--module", "lmdeploy"],
        ),
        (["python3", "/opt/fake_lmdeploy.py", "-x"], ["python3", "ENTRY", "--script", "/opt/fake_lmdeploy.py", "-x"]),
        (["python", "-c", "code"], None),
        (["conda", "run", "-n", "x", "lmdeploy"], None),
    ],
)
def test_python_commands_are_wrapped_others_are_not(command: list[str], expected: list[str] | None) -> None:
    wrapped = entry_prefix(command)
    if expected is None:
        assert wrapped is None
        return
    at = expected.index("ENTRY")
    # the key's fd comes first, then what to run; the program's own arguments follow `--`
    full = [*expected[:at], str(SERVE_ENTRY), "--key-fd", "0", *expected[at + 1 : at + 3], "--", *expected[at + 3 :]]
    assert wrapped == full


def test_console_scripts_are_wrapped_through_their_python(tmp_path: Path) -> None:
    direct = _script(tmp_path / "lmdeploy", "#!/opt/env/bin/python3.12")
    assert entry_prefix([direct]) == [
        "/opt/env/bin/python3.12",
        str(SERVE_ENTRY),
        "--key-fd",
        "0",
        "--script",
        direct,
        "--",
    ]
    through_env = _script(tmp_path / "lmdeploy2", "#!/usr/bin/env python3")
    wrapped = entry_prefix([through_env, "--extra"])
    assert wrapped is not None and wrapped[:3] == ["/usr/bin/env", "python3", str(SERVE_ENTRY)]
    assert wrapped[-3:] == [through_env, "--", "--extra"]
    shell = _script(tmp_path / "wrapper.sh", "#!/bin/sh")
    assert entry_prefix([shell]) is None
    assert build_hidden_key_argv(Profile(model="a/b", command=(shell,)), port=1) is None
    assert entry_prefix([str(tmp_path / "missing")]) is None
