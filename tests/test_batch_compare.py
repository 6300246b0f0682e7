"""`tuichat batch --compare A B`, `--sweep` with its table, terminal plot and SVG, a batch through an lmdeploy proxy
with the requests counted per node, and the files a stopped batch leaves. Against stand-in servers and the stand-in
proxy (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standin import fake_proxy
from standin.harness import Standin, free_port, run_standin, wait_for

from tuichat.chat.batch import ResultWriter, read_prompts
from tuichat.chat.sampling import Sampling
from tuichat.cli import batch as batchcli

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Standin, Standin]]:
    # B streams ten times as fast as A: its throughput must come out higher and its wall time shorter, by a margin
    # that per-request overheads on a loaded 2-core machine cannot eat (at 4x a CI-like load once gave 1.5x).
    with run_standin("--fake-rate", "60") as a, run_standin("--fake-rate", "600", model="tiny-w4a16") as b:
        yield a, b


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(*args: str | Path) -> int:
    return batchcli.main(["batch", *(str(a) for a in args)])


def prompts_file(tmp_path: Path, n: int, words: int = 8) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("".join(f"[[reply:{' '.join(['w'] * words)} {i}]]\n" for i in range(n)))
    return path


def test_compare_runs_the_batch_on_both_and_prints_the_summaries_side_by_side_with_the_ratio(
    pair: tuple[Standin, Standin], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    asked = (a.stats()["requests"], b.stats()["requests"])
    out = tmp_path / "o.jsonl"
    code = batch(
        prompts_file(tmp_path, 6, 20), "--compare", a.url, b.url, "--api-key", "test-key", "-c", "2", "--out", out
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (a.stats()["requests"] - asked[0], b.stats()["requests"] - asked[1]) == (6, 6)
    for side in ("A", "B"):
        got = rows(tmp_path / f"o.{side}.jsonl")
        assert [r["line"] for r in got] == [1, 2, 3, 4, 5, 6] and all(r["text"].startswith("w w") for r in got)
    assert not out.exists()
    lines = captured.out.splitlines()
    assert f"A: {a.url}" in lines[0] and f"B: {b.url}" in lines[0] and lines[0].rstrip().endswith("B/A")
    throughput = next(line for line in lines if line.strip().startswith("throughput"))
    ratio = float(throughput.split()[-1].rstrip("x"))
    assert ratio > 1.5  # B is ten times as fast
    wall = next(line for line in lines if line.strip().startswith("wall time"))
    assert float(wall.split()[-1].rstrip("x")) < 0.8
    for name in ("prompts", "errors", "TTFT p50/p95"):
        assert any(line.strip().startswith(name) for line in lines)
    figures = json.loads((tmp_path / "o.summary.json").read_text())["runs"]
    assert [(r["url"], r["prompts"], r["errors"], r["finished"]) for r in figures] == [
        (a.url, 6, 0, True),
        (b.url, 6, 0, True),
    ]
    assert figures[1]["throughput_tok_s"] > figures[0]["throughput_tok_s"] > 0


def test_compare_of_one_server_with_itself_or_a_bad_sweep_is_refused_with_a_sentence(
    pair: tuple[Standin, Standin], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _b = pair
    p = prompts_file(tmp_path, 1)
    out = tmp_path / "o.jsonl"
    assert batch(p, "--compare", a.url, a.url, "--out", out) == 1
    assert "A and B are the same server" in capsys.readouterr().err
    assert batch(p, "--url", a.url, "--sweep", "1,four", "--out", out) == 1
    assert "such as 1,4,16,64" in capsys.readouterr().err
    assert batch(p, "--url", a.url, "--sweep", "1,4", "-c", "4", "--out", out) == 1
    assert "either --concurrency or --sweep" in capsys.readouterr().err
    assert batch(p, "--url", a.url, "--plot", tmp_path / "x.svg", "--out", out) == 1
    assert "--plot draws a sweep" in capsys.readouterr().err
    assert batch(p, "--compare", "no-such-profile", a.url, "--out", out) == 1
    err = capsys.readouterr().err
    assert "no profile or fleet called 'no-such-profile'" in err and "Traceback" not in err


def test_a_sweep_of_both_targets_prints_a_table_a_terminal_plot_and_writes_an_svg_and_a_rerun_keeps_its_figures(
    pair: tuple[Standin, Standin], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = pair
    p = prompts_file(tmp_path, 4)
    out = tmp_path / "o.jsonl"
    args = (p, "--compare", a.url, b.url, "--api-key", "test-key", "--sweep", "4,1,2", "--out", out)
    assert batch(*args) == 0
    captured = capsys.readouterr()
    for side in ("A", "B"):
        for level in (1, 2, 4):
            assert len(rows(tmp_path / f"o.{side}.c{level}.jsonl")) == 4
    table = captured.out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["target", "concurrency"]
    body = [line.split() for line in table[1:]]
    assert [r[0] for r in body] == ["A:", "B:", "B/A"] * 3
    assert "Throughput (tok/s)" in captured.out and "TTFT p95 (s)" in captured.out and "concurrency" in captured.out
    svg = tmp_path / "o.sweep.svg"
    root = ET.fromstring(svg.read_text())
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}polyline")) == 4  # two panels, a line per target in each
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert f"A: {a.url}" in texts and f"B: {b.url}" in texts and texts.count("16") == 0 and texts.count("4") >= 2
    figures = json.loads((tmp_path / "o.summary.json").read_text())["runs"]
    assert sorted((r["url"], r["concurrency"]) for r in figures) == sorted(
        (u, c) for u in (a.url, b.url) for c in (1, 2, 4)
    )
    asked = (a.stats()["requests"], b.stats()["requests"])
    assert batch(*args, "--plot", tmp_path / "again.svg") == 0
    captured = capsys.readouterr()
    assert (a.stats()["requests"], b.stats()["requests"]) == asked  # every level was done: nothing asked again
    assert "done in an earlier run" in captured.err
    assert (tmp_path / "again.svg").read_text() == svg.read_text()


def test_a_batch_through_a_proxy_says_how_many_requests_each_node_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    argv = [sys.executable, fake_proxy.__file__, "serve", "proxy", "--server-name", "127.0.0.1", "--server-port"]
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed below, after the process
    proxy = subprocess.Popen([*argv, str(port)], stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with run_standin("--fake-rate", "300") as n1, run_standin("--fake-rate", "300") as n2:
            wait_for(lambda: _answers(url), timeout=10, message="the proxy up")
            for node in (n1, n2):
                httpx.post(f"{url}/nodes/add", json={"url": node.url, "status": {"models": ["tiny-chat"]}}, timeout=5)
            out = tmp_path / "o.jsonl"
            code = batch(prompts_file(tmp_path, 12), "--url", url, "--api-key", "test-key", "-c", "4", "--out", out)
            captured = capsys.readouterr()
            assert code == 0, captured.err
            served = {node.url: node.stats()["requests"] for node in (n1, n2)}
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait()
        log.close()
    assert sum(served.values()) == 12 and all(served.values())  # the proxy spread them (min expected latency)
    for node_url, count in served.items():
        assert f"node {node_url}: {count} requests" in captured.out
    figures = json.loads((tmp_path / "o.summary.json").read_text())["runs"]
    assert figures[0]["nodes"] == served


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/nodes/status", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_stopped_batch_leaves_each_finished_row_in_exactly_one_of_out_and_out_pending(tmp_path: Path) -> None:
    """The cause of the flaky Ctrl+C test: a row that finished early went to OUT.pending, later moved on to OUT too,
    and stayed in both; anyone merging the two (the test did) counted it twice."""
    items = read_prompts(prompts_file(tmp_path, 4), Sampling())
    out = tmp_path / "o.jsonl"
    writer = ResultWriter(out, items)
    for line in (2, 1, 4):  # 2 waits for 1, then both go to OUT; 4 waits for 3, which never comes
        writer.add({"line": line, **items[line - 1].source, "text": f"t{line}"})
    writer.close(complete=False)
    in_out = [r["line"] for r in rows(out)]
    pending = [r["line"] for r in rows(out.with_name("o.jsonl.pending"))]
    assert in_out == [1, 2] and pending == [4]
    resumed = ResultWriter(out, items)
    assert resumed.resumed == 3 and sorted(resumed.done) == [1, 2, 4]
    resumed.close(complete=False)
