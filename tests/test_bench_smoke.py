"""Smoke test of the benchmark harness (bench/): its tiny case runs end to end against the stand-in, so it cannot rot.

Not a measurement: it checks that every figure's table comes out with numbers in it, that a missing peer (oterm)
is reported as "not installed" instead of failing, and that the results file keeps what a person wrote around
the generated block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"-?\d+(?:\.\d+)?"


def _row(table: str, *cells: str) -> list[str]:
    """The cells of the first table row whose leading cells are `cells`."""
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("|") and parts[: len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row starting {cells} in:\n{table}")


def _number(cell: str) -> float:
    match = re.match(rf"^({NUMBER})(?: \(({NUMBER})\))?$", cell)
    assert match, f"not a number: {cell!r}"
    return float(match.group(1))


def test_quick_case_prints_every_figure_and_marks_a_missing_peer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path / "home"))
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\n## Notes by hand\nkept\n")
    env = dict(os.environ, BENCH_PEERS_VENV=str(tmp_path / "no-peers"), TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout

    # 1. start-up: the Textual floor and tuichat have timings; oterm is reported, not fatal
    floor = _row(table, "Textual floor (Static + Footer)")
    assert 0 < _number(floor[1]) < 30
    tui = _row(table, "tuichat")
    assert 0 < _number(tui[1]) < 30 and 0 < _number(tui[3]) < 60
    assert _row(table, "oterm")[1] == "not installed"

    # 2-3. streaming rows for each client and case, all of which showed every word
    cases = [("tuichat", "fresh"), ("tuichat", "10 earlier"), ("tuichat", "status pane"), ("raw httpx", "fresh")]
    if shutil.which("curl"):
        cases.append(("curl -N", "fresh"))
    else:
        assert _row(table, "curl -N", "–")[3] == "not installed"
    for client, case in cases:
        row = _row(table, client, case)
        assert _number(row[2]) == 300
        lag_p50, lag_p95 = _number(row[3]), _number(row[4])
        assert 0 <= lag_p50 <= lag_p95 < 30_000
        # CPU is counted in clock ticks of 10 ms: curl's and the raw loop's few ms of a quick run can round to 0 %
        # (the raw loop's did once, on a loaded machine); a Textual app's never do
        if client == "tuichat":
            assert _number(row[7]) > 0, f"{client} [{case}]: no CPU time measured for the client: {row}"
        assert re.fullmatch(r"[01]/1", row[6])
        assert len(row) == 9, f"{client} [{case}] reported an error: {row}"

    # 4. first-token overhead against the raw loop, and 5. memory
    ttft = table.split("### 4.")[1].split("###")[0]
    assert _number(_row(ttft, "raw httpx")[2]) == 0
    assert _number(_row(ttft, "tuichat")[1]) > 0
    memory = table.split("### 5.")[1].split("###")[0]
    assert 10 < _number(_row(memory, "tuichat")[1]) < 2000

    # goals are judged; the ones needing oterm cannot be and say so
    goals = table.split("### Goals")[1]
    assert _row(goals, "start-up below oterm")[2] == "–"
    assert _row(goals, "first-token overhead < 5 ms vs raw httpx")[2] in ("yes", "**no**")

    # the results file: generated block replaced, hand-written notes kept; raw trials saved as JSON
    written = out.read_text()
    assert "old table" not in written and "### Goals" in written and "## Notes by hand\nkept" in written
    trials = json.loads((tmp_path / "r.json").read_text())
    assert {t["client"] for t in trials["stream"]} == {c for c, _ in cases}
    assert all(t["visible"] == t["chunks"] for t in trials["stream"])
