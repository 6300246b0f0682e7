"""tuichat's calibration entry on CPU: reading local text, cutting `[1, seqlen]` samples, replacing lmdeploy's loader.

No torch and no lmdeploy: a word-level tokenizer stands in for the model's, the tensor seam makes plain lists,
and `lmdeploy.lite.apis.*` are small modules put into `sys.modules` for the test.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fake_lite
import pytest

from tuichat.models import calib_entry
from tuichat.models.calib_entry import CalibrationError, auto_awq_kwargs, cut_samples, make_loader, parser, prepare
from tuichat.models.quantize import QuantizeOptions, diagnose

# lmdeploy 0.18's auto_awq parameters (lmdeploy/lite/apis/auto_awq.py), all of which its CLI passes
AUTO_AWQ_PARAMS = {
    "model",
    "work_dir",
    "calib_dataset",
    "calib_samples",
    "batch_size",
    "calib_seqlen",
    "w_bits",
    "w_sym",
    "w_group_size",
    "search_scale",
    "device",
    "revision",
    "dtype",
    "download_dir",
    "trust_remote_code",
}


class WordTokenizer:
    """One token per word (ids from a growing vocabulary), plus a BOS token, as many real tokenizers add."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [0, *(self.vocab.setdefault(w, len(self.vocab)) for w in text.split())]}

    def words(self, ids: Sequence[int]) -> list[str]:
        names = {v: k for k, v in self.vocab.items()}
        return [names[i] for i in ids]


def as_rows(ids: Sequence[int]) -> list[list[int]]:
    return [list(ids)]


def test_samples_are_separate_windows_of_seqlen_spread_over_the_text() -> None:
    ids = list(range(10_000))
    samples = cut_samples(ids, 8, 500)

    assert len(samples) == 8 and all(len(s) == 500 for s in samples)
    assert all(s == list(range(s[0], s[0] + 500)) for s in samples)  # contiguous text
    starts = [s[0] for s in samples]
    assert all(b - a >= 500 for a, b in itertools.pairwise(starts))  # never overlapping
    assert starts[-1] - starts[0] > 5000  # not all from the beginning
    assert cut_samples(ids, 8, 500) == samples  # the same text gives the same samples
    assert cut_samples(ids, 8, 500, seed=1) != samples


def test_too_little_text_says_how_many_samples_it_can_give() -> None:
    with pytest.raises(CalibrationError) as refused:
        cut_samples(list(range(2500)), 4, 1024)
    message = str(refused.value)
    assert "has 2500 tokens, enough for 2 samples of 1024 tokens, but 4 were asked" in message
    assert "lower --calib-samples to 2" in message and "--calib-samples 0" in message

    with pytest.raises(CalibrationError, match="lower --calib-seqlen to 300 or less"):
        cut_samples(list(range(300)), 1, 1024)
    assert len(cut_samples(list(range(2048)), 2, 1024)) == 2  # exactly enough is enough


def test_the_loader_hands_lmdeploy_the_samples_through_the_tensor_seam() -> None:
    loader = make_loader([[1, 2, 3], [4, 5, 6]], as_rows)

    # calibrate() calls it as get_calib_loaders(name, tokenizer, nsamples=..., seqlen=...)
    assert loader("wikitext2", object(), nsamples=2, seqlen=3) == [[[1, 2, 3]], [[4, 5, 6]]]
    with pytest.raises(CalibrationError, match="asked for 2 samples of 4 tokens, but 2 of 3 were prepared"):
        loader("wikitext2", object(), nsamples=2, seqlen=4)


def test_prepare_reads_tokenizes_and_cuts_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs" / ".git").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("alpha " * 300)
    (tmp_path / "docs" / "b.md").write_text("beta " * 300)
    chats = [{"messages": [{"role": "user", "content": "gamma " * 100}, {"role": "assistant", "content": "delta"}]}]
    chats.append({"text": "epsilon " * 100})
    lines = [json.dumps(c) for c in chats]
    (tmp_path / "docs" / "c.jsonl").write_text("\n".join([*lines, "not json", ""]))
    (tmp_path / "docs" / ".git" / "x.txt").write_text("hidden " * 1000)
    (tmp_path / "docs" / "d.csv").write_text("csv " * 1000)
    args = parser().parse_args(
        ["m", "--calib-file", str(tmp_path / "docs"), "--calib-samples", "8", "--calib-seqlen", "100"]
    )
    tokenizer = WordTokenizer()

    loader = prepare(args, tokenizer, as_rows)

    samples = loader("wikitext2", tokenizer, nsamples=8, seqlen=100)
    words = {w for rows in samples for w in tokenizer.words(rows[0])}
    assert words <= {"<s>", "alpha", "beta", "gamma", "delta", "epsilon"}
    assert "hidden" not in tokenizer.vocab and "csv" not in tokenizer.vocab
    assert {"gamma", "epsilon"} <= set(tokenizer.vocab)
    assert "8 samples of 100 tokens from 802 tokens" in capsys.readouterr().out


def test_auto_awq_gets_what_lmdeploys_cli_would_pass(tmp_path: Path) -> None:
    args = parser().parse_args(
        [
            *("/m", "--calib-file", "t.txt", "--work-dir", "/w", "--calib-samples", "16", "--calib-seqlen", "256"),
            *("--w-bits", "4", "--w-group-size", "64", "--dtype", "float16", "--trust-remote-code"),
        ]
    )
    kwargs = auto_awq_kwargs(args)

    assert set(kwargs) == AUTO_AWQ_PARAMS
    assert set(kwargs) == set(inspect.signature(fake_lite.auto_awq).parameters) - {"_switches"}
    assert kwargs["calib_dataset"] in fake_lite.DATASETS  # calibrate() asserts a known name
    assert (kwargs["model"], kwargs["work_dir"], kwargs["calib_samples"], kwargs["calib_seqlen"]) == (
        "/m",
        "/w",
        16,
        256,
    )
    assert (kwargs["w_bits"], kwargs["w_group_size"], kwargs["dtype"], kwargs["trust_remote_code"]) == (
        4,
        64,
        "float16",
        True,
    )
    assert (kwargs["w_sym"], kwargs["search_scale"], kwargs["batch_size"], kwargs["device"]) == (
        False,
        False,
        1,
        "cuda",
    )


def test_main_replaces_lmdeploys_loader_before_calling_auto_awq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibrate_module = types.ModuleType("lmdeploy.lite.apis.calibrate")

    def hub_loader(*args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("the hub loader must not be called")

    calibrate_module.get_calib_loaders = hub_loader  # type: ignore[attr-defined]
    seen: dict[str, Any] = {}

    def auto_awq(**kwargs: Any) -> None:
        # what lmdeploy's calibrate() does: look the loader up in its own module, then use it
        loader = calibrate_module.get_calib_loaders  # type: ignore[attr-defined]
        seen["data"] = loader(kwargs["calib_dataset"], None, nsamples=kwargs["calib_samples"], seqlen=4)
        seen["kwargs"] = kwargs

    awq_module = types.ModuleType("lmdeploy.lite.apis.auto_awq")
    awq_module.auto_awq = auto_awq  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmdeploy.lite.apis.calibrate", calibrate_module)
    monkeypatch.setitem(sys.modules, "lmdeploy.lite.apis.auto_awq", awq_module)
    monkeypatch.setattr(calib_entry, "load_tokenizer", lambda args: WordTokenizer())
    monkeypatch.setattr(calib_entry, "torch_tensor", as_rows)
    (tmp_path / "t.txt").write_text("one two three four five six seven eight nine ten")

    code = calib_entry.main(
        ["/m", "--calib-file", str(tmp_path / "t.txt"), "--calib-samples", "2", "--calib-seqlen", "4"]
    )

    assert code == 0
    assert len(seen["data"]) == 2 and all(len(rows[0]) == 4 for rows in seen["data"])
    assert seen["kwargs"]["model"] == "/m"


def test_main_explains_too_little_text_in_one_line_tuichat_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(calib_entry, "load_tokenizer", lambda args: WordTokenizer())
    (tmp_path / "t.txt").write_text("a few words only")

    code = calib_entry.main(["/m", "--calib-file", str(tmp_path / "t.txt"), "--calib-samples", "8"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 2
    assert lines[-1].startswith("tuichat calibration: The calibration text has 5 tokens")
    message, hint = diagnose(["Loading weights: 100%", lines[-1]], 2, QuantizeOptions(model="m", out=Path("o")))
    assert message.startswith("quantization failed: The calibration text has 5 tokens, enough for 0 samples")
    assert hint is None  # the sentence already says what to do
