"""The quantize job (lmdeploy lite auto_awq, played by tests/fake_lite.py) and `tuichat quantize` / `models`."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tuichat import modelcli
from tuichat.cli import main
from tuichat.config import load_config
from tuichat.errors import TuichatError
from tuichat.procgroup import group_pids
from tuichat.profiles import parse_profile
from tuichat.quantize import AwqProgress, JobStatus, QuantizeJob, QuantizeOptions, build_argv, diagnose

FAKE = Path(__file__).with_name("fake_lite.py")
SRC = Path(__file__).resolve().parents[1] / "src"

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "torch_dtype": "bfloat16",
}

# What lmdeploy 0.18.0 printed on an H200 for a 4-layer Qwen2 (trimmed; tqdm's carriage returns kept).
REAL_LOG = (
    "[transformers] `torch_dtype` is deprecated! Use `dtype` instead!\n"
    "Loading weights:   0%|          | 0/51 [00:00<?, ?it/s]\rLoading weights: 100%|##########| 51/51 "
    "[00:00<00:00, 6823.27it/s]\n"
    "Move model.embed_tokens to GPU.\nMove model.layers.0 to CPU.\nMove model.layers.1 to CPU.\n"
    "Move model.layers.2 to CPU.\nMove model.layers.3 to CPU.\nMove model.norm to GPU.\n"
    "Move model.rotary_emb to GPU.\nMove lm_head to CPU.\nLoading calibrate dataset ...\n"
    "model.layers.0, samples: 16, max gpu memory: 0.04 GB\nmodel.layers.1, samples: 16, max gpu memory: 0.04 GB\n"
    "model.layers.2, samples: 16, max gpu memory: 0.04 GB\nmodel.layers.3, samples: 16, max gpu memory: 0.04 GB\n"
    "model.layers.0 smooth weight done. max gpu memory: 0.05 GB\n"
    "model.layers.1 smooth weight done. max gpu memory: 0.05 GB\n"
    "model.layers.0.self_attn.q_proj weight packed.\nmodel.layers.0.mlp.down_proj weight packed.\n"
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-chat"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def options(model: Path, out: Path, *fake: str, **changes: object) -> QuantizeOptions:
    command = [sys.executable, str(FAKE), "--fake-seconds", "0.2", *fake]
    return QuantizeOptions(model=str(model), out=out, command=command, **changes)  # type: ignore[arg-type]


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders the job may have left beside its output."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_argv_is_lmdeploys_auto_awq_command(tmp_path: Path) -> None:
    opts = QuantizeOptions(model="internlm/internlm2-chat-1_8b", out=tmp_path / "w4", command=["lmdeploy"])

    assert build_argv(opts) == [
        "lmdeploy",
        "lite",
        "auto_awq",
        "internlm/internlm2-chat-1_8b",
        "--calib-dataset",
        "wikitext2",
        "--calib-samples",
        "128",
        "--calib-seqlen",
        "1024",
        "--w-bits",
        "4",
        "--w-group-size",
        "128",
        "--work-dir",
        str(tmp_path / "w4"),
    ]


def test_progress_parser_follows_real_lmdeploy_output() -> None:
    progress = AwqProgress()
    seen: list[tuple[str, int, int | None]] = []
    for line in REAL_LOG.replace("\r", "\n").splitlines():
        progress.feed_line(line)
        seen.append((progress.phase, progress.layers_done, progress.layers_total))

    assert ("calibrating", 2, 4) in seen
    assert ("calibrating", 4, 4) in seen
    assert ("smoothing", 2, 4) in seen
    assert progress.phase == "quantizing"
    assert progress.layers_total == 4  # lm_head and norms are not decoder layers
    fraction = progress.fraction
    assert fraction is not None and 0.6 < fraction < 0.75


def test_successful_job_shows_progress_and_makes_an_awq_profile(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tiny-chat-w4"
    job = QuantizeJob.start(options(model, out, "--fake-seconds", "0.6"), tmp_path / "q.log")
    statuses: list[JobStatus] = []
    while not (statuses and statuses[-1].finished):
        statuses.append(job.poll())
        time.sleep(0.01)

    final = statuses[-1]
    assert final.state == "done", final
    assert final.out == out.absolute()
    calibrating = [s for s in statuses if s.phase == "calibrating" and s.layers_done > 0]
    assert calibrating and calibrating[0].layers_total == 6
    assert any(s.phase == "quantizing" for s in statuses)
    assert [s.layers_done for s in calibrating] == sorted(s.layers_done for s in calibrating)
    assert final.elapsed_s > 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert leftovers(out.parent) == []
    assert not group_pids(job.pid)
    assert "Move model.layers.5 to CPU." in (tmp_path / "q.log").read_text()  # the log is kept

    name, table = job.profile()
    assert name == "tiny-chat-w4"
    assert table["model"] == str(out.absolute())
    assert table["model_format"] == "awq"
    assert table["cache_max_entry_count"] == 0.4
    parse_profile(name, table, "config.toml")


@pytest.mark.parametrize(
    ("fake", "changes", "message", "hint"),
    [
        (["--fake-fail", "oom"], {}, "CUDA out of memory", "lower --calib-samples"),
        (
            ["--fake-fail", "download"],
            {},
            "Couldn't reach",
            "the calibration data (wikitext2) must be downloaded from the Hugging Face hub; "
            "this machine cannot reach it: run it where the hub is reachable, or pre-download the dataset "
            "into the HF cache",
        ),
        (["--fake-fail", "nogpu"], {}, "does not support bfloat16", "--dtype float16"),
        (["--fake-fail", "nogpu"], {"dtype": "float16"}, "No CUDA GPUs are available", "CUDA_VISIBLE_DEVICES"),
        ([], {"calib_dataset": "ptb"}, "invalid choice: 'ptb'", "pick one of wikitext2, c4"),
    ],
)
def test_failures_give_the_reason_and_a_hint_and_leave_nothing(
    model: Path, tmp_path: Path, fake: list[str], changes: dict[str, object], message: str, hint: str
) -> None:
    out = tmp_path / "new" / "deeper" / "w4"
    job = QuantizeJob.start(options(model, out, *fake, **changes), tmp_path / "q.log")

    status = job.wait(timeout=20)

    assert status.state == "failed"
    assert message in status.message
    assert status.hint is not None and hint in status.hint
    assert not out.exists()
    assert not (tmp_path / "new").exists()  # the folders the job made for the output are gone too
    assert leftovers(tmp_path) == []
    assert not group_pids(job.pid)


def test_a_hub_id_that_cannot_be_downloaded(tmp_path: Path) -> None:
    opts = QuantizeOptions(model="nobody/not-a-model", out=tmp_path / "w4", command=[sys.executable, str(FAKE)])
    status = QuantizeJob.start(opts, tmp_path / "q.log").wait(timeout=20)

    assert status.state == "failed"
    assert "LocalEntryNotFoundError" in status.message
    assert status.hint is not None and "tried to download it from the hub" in status.hint
    assert not (tmp_path / "w4").exists()


def test_a_missing_model_folder_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(TuichatError, match="no model folder at"):
        QuantizeJob.start(options(tmp_path / "nope", tmp_path / "w4"), tmp_path / "q.log")
    assert not (tmp_path / "w4").exists()


def test_an_already_quantized_model_is_refused(model: Path, tmp_path: Path) -> None:
    config = {**CONFIG, "quantization_config": {"quant_method": "awq", "bits": 4}}
    (model / "config.json").write_text(json.dumps(config))

    with pytest.raises(TuichatError, match="already quantized"):
        QuantizeJob.start(options(model, tmp_path / "w4"), tmp_path / "q.log")


def test_cancel_of_a_hanging_job_leaves_no_process_and_no_partial_folder(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "made-for-it" / "w4"
    job = QuantizeJob.start(options(model, out, "--fake-hang"), tmp_path / "q.log")
    wait_for(lambda: job.poll().layers_done >= 1)
    assert len(group_pids(job.pid)) == 2  # lmdeploy and its worker
    assert any(job.staging.iterdir())  # it has written partial output

    result = job.cancel(timeout=2.0)

    assert result.clean
    assert result.signal_used == "SIGTERM"  # the worker ignored SIGINT; the group stop went on
    assert not group_pids(job.pid)
    assert not job.staging.exists()
    assert not (tmp_path / "made-for-it").exists()
    status = job.poll()
    assert status.state == "cancelled"
    assert "partial output is removed" in status.message


def test_an_existing_output_folder_is_never_replaced_without_confirmation(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    with pytest.raises(TuichatError, match="already exists and is not empty"):
        QuantizeJob.start(options(model, out), tmp_path / "q.log")
    assert (out / "mine.txt").read_text() == "keep me"

    failed = QuantizeJob.start(options(model, out, "--fake-fail", "oom"), tmp_path / "q.log", overwrite=True)
    assert failed.wait(timeout=20).state == "failed"
    assert (out / "mine.txt").read_text() == "keep me"  # a failure never touches a folder that existed

    done = QuantizeJob.start(options(model, out), tmp_path / "q.log", overwrite=True)
    assert done.wait(timeout=20).state == "done"
    assert not (out / "mine.txt").exists()
    assert (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_an_existing_empty_output_folder_is_used_and_kept_on_failure(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    out.mkdir()

    failed = QuantizeJob.start(options(model, out, "--fake-fail", "download"), tmp_path / "q.log")
    assert failed.wait(timeout=20).state == "failed"
    assert out.is_dir()  # it existed before the job, so it stays

    done = QuantizeJob.start(options(model, out), tmp_path / "q.log")
    assert done.wait(timeout=20).state == "done"
    assert (out / "config.json").exists()


def test_diagnose_a_model_download_failure_from_real_output() -> None:
    lines = [
        "can't find model from local_path internlm/x, try to download from remote",
        "Traceback (most recent call last):",
        "httpx.ConnectError: [Errno -3] Temporary failure in name resolution",
        "huggingface_hub.errors.LocalEntryNotFoundError: Got: ConnectError: [Errno -3] Temporary failure in "
        "name resolution",
        "An error happened while trying to locate the files on the Hub, and we cannot find the appropriate "
        "snapshot folder for the specified revision on the local disk. Please check your internet connection "
        "and try again.",
    ]
    opts = QuantizeOptions(model="internlm/x", out=Path("w4"))

    message, hint = diagnose(lines, 1, opts)

    assert message.startswith("quantization failed: huggingface_hub.errors.LocalEntryNotFoundError")
    assert hint is not None and "'internlm/x' is not a local folder" in hint


def test_diagnose_a_missing_datasets_package_and_a_killed_job() -> None:
    opts = QuantizeOptions(model="m", out=Path("w4"))
    _, hint = diagnose(["ModuleNotFoundError: No module named 'datasets'"], 1, opts, saw_dataset_loading=True)
    assert hint is not None and "pip install datasets" in hint

    message, hint = diagnose(["model.layers.3, samples: 128, max gpu memory: 3.1 GB"], -9, opts)
    assert "killed by signal 9" in message
    assert hint is not None and "CPU memory" in hint


# ---------------------------------------------------------------- the CLI


def test_quantize_command_prints_progress_and_saves_the_profile(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny-chat-w4"
    lmdeploy = f"{sys.executable} {FAKE} --fake-seconds 1.5"

    code = main(["quantize", str(model), "--out", str(out), "--lmdeploy", lmdeploy])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"\[00:0\d\] (calibrating|smoothing|quantizing): \d of 6 layers\n", captured.out)
    assert "[profiles.tiny-chat-w4]" in captured.out
    assert 'model_format = "awq"' in captured.out
    assert "cache_max_entry_count = 0.4" in captured.out
    profile = load_config().profiles["tiny-chat-w4"]
    assert profile.model_format == "awq"
    assert profile.cache_max_entry_count == 0.4
    assert profile.model == str(out)

    # a second run must not clobber the output or the profile
    code = main(["quantize", str(model), "--out", str(out), "--lmdeploy", lmdeploy])
    assert code == 1
    assert "already exists and is not empty" in capsys.readouterr().err


def test_quantize_command_failure_prints_reason_and_hint(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lmdeploy = f"{sys.executable} {FAKE} --fake-fail oom"

    code = main(["quantize", str(model), "--out", str(tmp_path / "w4"), "--lmdeploy", lmdeploy])

    err = capsys.readouterr().err
    assert code == 1
    assert "CUDA out of memory" in err
    assert "hint: the GPU ran out of memory" in err
    assert "tiny-chat-w4" not in load_config().profiles
    assert not (tmp_path / "w4").exists()


def test_ctrl_c_on_the_quantize_command_cancels_cleanly(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}
    lmdeploy = f"{sys.executable} {FAKE} --fake-hang"
    cli = subprocess.Popen(
        [sys.executable, "-m", "tuichat", "quantize", str(model), "--out", str(out), "--lmdeploy", lmdeploy],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert cli.stdout is not None
    first = cli.stdout.readline()
    job_pid = int(first.split("(pid ")[1].split(")")[0])
    for line in cli.stdout:
        if "calibrating: 1 of" in line:
            break
    cli.send_signal(signal.SIGINT)
    rest, err = cli.communicate(timeout=30)

    assert cli.returncode == 130
    assert "cancelling" in rest
    assert "every lmdeploy process has stopped" in err
    assert not group_pids(job_pid)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_models_command_lists_a_table(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")

    code = main(["models", "--root", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 0
    header, row = captured.out.splitlines()[:2]
    assert header.split() == ["NAME", "ARCH", "PARAMS", "DTYPE", "QUANT", "SIZE", "VLM", "PATH"]
    assert row.split()[:4] == ["tiny-chat", "Qwen2ForCausalLM", "4.1M", "bfloat16"]
    assert "broken" in captured.err and "not valid JSON" in captured.err


def test_models_command_with_nothing_found_says_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    parser_args = argparse.Namespace(model_command="models", root=[], no_caches=False)

    assert modelcli.run(parser_args) == 0
    assert "No local models found" in capsys.readouterr().out
