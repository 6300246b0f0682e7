"""The one log follower: new lines only, the unfinished line kept, a cut first line dropped, truncation survived."""

from __future__ import annotations

from pathlib import Path

from tuichat.server.logfollow import LogFollower, collapse_cr


def test_it_reads_only_what_arrived_and_keeps_the_unfinished_line(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("one\ntwo\nthr")
    follower = LogFollower(log)
    assert follower.read() == (["one", "two"], "thr")
    with log.open("a") as fh:
        fh.write("ee\nfour")
    assert follower.read() == (["three"], "four")
    assert follower.read() == ([], "four")
    assert follower.flush() == "four"
    assert follower.read() == ([], "")


def test_starting_near_the_end_drops_the_cut_line_only(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("first line\nsecond line\n")
    assert LogFollower(log, start_at_end=8).read() == ([], "")  # "d line\n" is half a line
    assert LogFollower(log, start_at_end=len("second line\n")).read() == (["second line"], "")
    at_end = LogFollower(log, start_at_end=0)
    with log.open("a") as fh:
        fh.write("third\n")
    assert at_end.read() == (["third"], "")


def test_a_character_split_across_reads_is_decoded_whole(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    data = "héllo\n".encode()
    log.write_bytes(data[:2])
    follower = LogFollower(log)
    assert follower.read() == ([], "h")  # half of the é waits for its other byte
    with log.open("ab") as fh:
        fh.write(data[2:])
    assert follower.read() == (["héllo"], "")


def test_a_truncated_log_is_read_again_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("old run, a long line\n")
    follower = LogFollower(log)
    assert follower.read()[0] == ["old run, a long line"]
    log.write_text("new\n")
    assert follower.read() == (["new"], "")


def test_an_endless_progress_bar_does_not_grow_without_bound(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("\r".join(f"bar {n:06d}" for n in range(20000)))
    lines, partial = LogFollower(log).read()
    assert lines == [] and len(partial) <= 65536 and partial.endswith("bar 019999")
    assert collapse_cr(partial) == "bar 019999"


def test_a_missing_log_reads_as_empty_until_it_appears(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    follower = LogFollower(log)
    assert follower.read() == ([], "")
    log.write_text("hello\n")
    assert follower.read() == (["hello"], "")
