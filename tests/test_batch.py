"""`tuichat batch`: prompts from JSONL or text, N in flight, rows in input order, errors as fields, resume after
Ctrl+C or a crash without asking finished prompts again. Against the stand-in lmdeploy server (real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standin.harness import Standin, free_port, run_standin, wait_for

from tuichat.cli import batch as batchcli

SRC = str(Path(batchcli.__file__).parent.parent)
TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def standin() -> Iterator[Standin]:
    with run_standin("--fake-rate", "500", "--session-len", "200") as s:
        yield s


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(*args: str | Path) -> int:
    return batchcli.main(["batch", *(str(a) for a in args)])


def test_jsonl_prompts_messages_and_per_line_sampling_come_back_in_input_order(
    standin: Standin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "[[reply:" + " ".join(f"slow{i}" for i in range(60)) + "]]"},  # finishes last
        {"prompt": "two [[reply:second answer]]"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "[[reply:third]]"}]},
        {"prompt": "[[reply:a b c d e f g h]]", "max_tokens": 3},
        {"prompt": "[[reply:x y z]]", "sampling": {"temperature": 0.5}},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert batch(prompts, "--url", standin.url, "--api-key", "test-key", "-c", "3", "--out", out) == 0
    got = rows(out)
    assert [r["line"] for r in got] == [1, 2, 3, 4, 5]
    assert got[0]["text"].startswith("slow0 slow1") and got[1]["text"] == "second answer"
    assert got[2]["text"] == "third" and got[2]["messages"] == lines[2]["messages"]
    assert got[3]["finish_reason"] == "length" and got[3]["completion_tokens"] == 3 and got[3]["max_tokens"] == 3
    for r in got:
        assert r["prompt_tokens"] > 0 and r["ttft_s"] > 0 and r["seconds"] >= r["ttft_s"] and "error" not in r
    assert not (tmp_path / "out.jsonl.pending").exists()
    captured = capsys.readouterr()
    assert "5/5" in captured.err and "tok/s" in captured.err
    assert "TTFT p50/p95" in captured.out and "errors: 0" in captured.out


def test_plain_text_is_one_prompt_per_line_and_the_system_prompt_is_sent(standin: Standin, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("[[reply:one]]\n\n[[reply:two]]\n")
    out = tmp_path / "o.jsonl"
    assert batch(prompts, "--url", standin.url, "--api-key", "test-key", "--out", out) == 0
    assert [(r["line"], r["prompt"], r["text"]) for r in rows(out)] == [
        (1, "[[reply:one]]", "one"),
        (3, "[[reply:two]]", "two"),
    ]


def test_a_failed_prompt_is_a_row_with_an_error_and_the_rest_still_run(
    standin: Standin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "[[reply:fine]]"}\n'
        "{not json\n" + json.dumps({"prompt": "word " * 300}) + "\n" + '{"prompt": "[[reply:bad]]", "temperature": 9}\n'
        '{"prompt": "[[reply:also fine]]"}\n'
    )
    out = tmp_path / "o.jsonl"
    assert batch(prompts, "--url", standin.url, "--api-key", "test-key", "--out", out) == 1
    got = rows(out)
    assert [r.get("error") is None for r in got] == [True, False, False, False, True]
    assert "not valid JSON" in got[1]["error"]
    assert "too long" in got[2]["error"]
    assert "temperature" in got[3]["error"] and "[0, 2]" in got[3]["error"]
    assert got[4]["text"] == "also fine"
    assert "3 prompt(s) failed" in capsys.readouterr().err


def test_a_rerun_asks_again_only_what_failed(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("[[reply:a]]\n[[reply:b]]\n")
    out = tmp_path / "o.jsonl"
    out.write_text(
        json.dumps({"line": 1, "prompt": "[[reply:a]]", "text": "kept from before"})
        + "\n"
        + json.dumps({"line": 2, "prompt": "[[reply:b]]", "text": "", "error": "server was down"})
        + "\n"
    )
    with run_standin("--fake-rate", "500") as s:
        assert batch(prompts, "--url", s.url, "--api-key", "test-key", "--out", out) == 0
        assert s.stats()["requests"] == 1
    assert [r["text"] for r in rows(out)] == ["kept from before", "b"]


def test_results_for_other_prompts_are_not_mixed_in(standin: Standin, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("new prompt\n")
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"line": 1, "prompt": "old prompt", "text": "x"}) + "\n")
    assert batch(prompts, "--url", standin.url, "--out", out) == 1
    assert rows(out)[0]["prompt"] == "old prompt"


def test_a_server_that_is_down_is_one_sentence_not_a_row_per_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "o.jsonl"
    assert batch(prompts, "--url", f"http://127.0.0.1:{free_port()}", "--out", out) == 1
    err = capsys.readouterr().err
    assert "cannot reach the server" in err and "Traceback" not in err
    assert out.read_text() == ""


def test_a_profile_that_is_not_running_says_how_to_start_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert batch(prompts, "--profile", "internlm2-pytorch", "--out", tmp_path / "o.jsonl") == 1  # built-in, not started
    assert "tuichat serve internlm2-pytorch --detach" in capsys.readouterr().err


def _start(prompts: Path, out: Path, url: str, concurrency: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS])}
    argv = [sys.executable, "-m", "tuichat.cli.batch", "batch", str(prompts), "--url", url, "--api-key", "test-key"]
    argv += ["-c", str(concurrency), "--out", str(out)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_keeps_every_finished_row_and_a_rerun_finishes_without_asking_them_again(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"[[reply:{' '.join(['w'] * 12)} {i}]]\n" for i in range(12)))
    out = tmp_path / "o.jsonl"
    with run_standin("--fake-rate", "60") as s:
        proc = _start(prompts, out, s.url, 2)
        try:
            wait_for(lambda: s.stats()["running"] == 2, timeout=15, message="two requests in flight")
            wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, timeout=15, message="rows")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
        assert proc.returncode == 130 and "Traceback" not in err
        assert "run the same command again" in err
        # a request cut by the Ctrl+C may be kept as a failed row: a re-run asks it again, like any failure
        pending = rows(out.with_name("o.jsonl.pending"))
        assert not {r["line"] for r in rows(out)} & {r["line"] for r in pending}  # each finished row kept once
        first = [r for r in rows(out) + pending if not r.get("error")]
        assert 3 <= len(first) < 12
        asked = s.stats()["requests"]
        rerun = _start(prompts, out, s.url, 4)
        _, err = rerun.communicate(timeout=30)
        assert rerun.returncode == 0, err
        assert f"{len(first)} of 12 already done" in err
        assert s.stats()["requests"] == asked + 12 - len(first)
    final = rows(out)
    assert [r["line"] for r in final] == list(range(1, 13))
    assert all(r["text"].endswith(f" {r['line'] - 1}") for r in final)
    for row in first:
        assert final[row["line"] - 1] == row


def test_rows_that_finish_early_survive_a_crash(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    long = "[[reply:" + " ".join(["w"] * 400) + "]]"
    prompts.write_text(long + "\n" + "".join(f"[[reply:short {i}]]\n" for i in range(3)))
    out = tmp_path / "o.jsonl"
    pending = out.with_name("o.jsonl.pending")
    with run_standin("--fake-rate", "100") as s:
        proc = _start(prompts, out, s.url, 4)
        try:
            wait_for(lambda: pending.exists() and len(pending.read_text().splitlines()) == 3, timeout=15)
            assert out.read_text() == ""  # line 1 is still streaming: nothing may go ahead of it in OUT
            proc.kill()  # no chance to clean up
            proc.wait()
        finally:
            proc.kill()
        asked = s.stats()["requests"]
        start = time.monotonic()
        rerun = _start(prompts, out, s.url, 4)
        _, err = rerun.communicate(timeout=30)
        assert rerun.returncode == 0, err
        assert s.stats()["requests"] == asked + 1, time.monotonic() - start
    assert [r["text"] for r in rows(out)][1:] == ["short 0", "short 1", "short 2"]
    assert not pending.exists()
