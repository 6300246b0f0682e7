"""The quantize job (lmdeploy lite auto_awq, played by tests/fake_lite.py) and `tuichat quantize` / `models`.

Local calibration runs tuichat's real entry (`python -m tuichat.models.calib_entry`) in the job's process, against the
fake `lmdeploy`, `torch` and `transformers` that `fake_lite.make_site` puts on PYTHONPATH. The machine is told
apart by `Probes`: no test reaches a hub or reads a GPU.
"""

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

import fake_lite
import pytest

from tuichat.chat.store import Store
from tuichat.cli import models as modelcli
from tuichat.cli.main import main
from tuichat.config import load_config
from tuichat.errors import TuichatError
from tuichat.models import quantize
from tuichat.models.quantize import (
    AwqProgress,
    JobStatus,
    Probes,
    QuantizeJob,
    QuantizeOptions,
    build_argv,
    diagnose,
    find_orphan_jobs,
)
from tuichat.server.gpu import GpuInfo, GpuSnapshot
from tuichat.server.procgroup import group_pids
from tuichat.server.profiles import parse_profile, profile_to_table

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


GB = 1000**3
ONLINE = Probes(
    has_module=lambda python, name: True,
    hub_reachable=lambda: True,
    dataset_cached=lambda name: False,
    gpu_snapshot=lambda: None,
    disk_free=lambda path: 10**15,
)
OFFLINE = Probes(
    has_module=lambda python, name: name != "datasets",
    hub_reachable=lambda: False,
    dataset_cached=lambda name: False,
    gpu_snapshot=lambda: None,
    disk_free=lambda path: 10**15,
)
TEXT = (
    "The lighthouse keeper counted the ships that passed in the night, and wrote each name in a blue book. "
    "In the morning the fog lifted and the harbour filled with gulls, fishermen and the smell of bread. "
) * 40  # about 8 KB


@pytest.fixture(autouse=True)
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs on a machine with `datasets` and a hub, unless it says otherwise; never a real probe."""
    monkeypatch.setattr(quantize, "DEFAULT_PROBES", ONLINE)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake lmdeploy, torch and transformers on the job's PYTHONPATH (this test process is not affected)."""
    folder = fake_lite.make_site(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder


def write_weights(folder: Path, count: int) -> None:
    """A bf16 safetensors file of `count` parameters (zeros), so that sizes before and after can be compared."""
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [count], "data_offsets": [0, 2 * count]}}
    )
    raw = header.encode()
    with (folder / "model.safetensors").open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + b"\0" * (2 * count))


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


def calib_record(out: Path) -> dict[str, object]:
    """What the fake quantizer was calibrated on (it keeps that in inputs_stats.pth)."""
    record = json.loads((out / "inputs_stats.pth").read_text())
    assert isinstance(record, dict)
    return record


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

    name, profile = job.make_profile()
    assert name == "tiny-chat-w4"
    assert profile.model == str(out.absolute())
    assert profile.model_format == "awq"
    assert profile.cache_max_entry_count == 0.4
    assert parse_profile(name, profile_to_table(profile), "config.toml") == profile


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


def _hanging_quantize_cli(model: Path, out: Path, text_file: Path, site: Path) -> subprocess.Popen[str]:
    """`tuichat quantize` as a user runs it, on a fake lmdeploy lite that hangs mid-job (to be cancelled or killed)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{site}", "PYTHONUNBUFFERED": "1", "FAKE_LITE": "--fake-hang"}
    argv = [sys.executable, "-m", "tuichat", "quantize", str(model), "--out", str(out), "--calib-file", str(text_file)]
    argv += ["--calib-samples", "4", "--calib-seqlen", "256", "--lmdeploy", f"{sys.executable} -m lmdeploy"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_on_the_quantize_command_cancels_cleanly(model: Path, tmp_path: Path, site: Path) -> None:
    out = tmp_path / "w4"
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    cli = _hanging_quantize_cli(model, out, text_file, site)
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


# ---------------------------------------------------------------- calibration sources


def test_diagnose_still_explains_lmdeploys_own_refusal_of_a_set() -> None:
    line = (
        "lmdeploy lite auto_awq: error: argument --calib-dataset: invalid choice: 'ptb' (choose from 'c4', 'pileval')"
    )
    message, hint = diagnose([line], 2, QuantizeOptions(model="m", out=Path("w4")))
    assert "invalid choice: 'ptb'" in message
    assert hint is not None and "pick one of c4, pileval" in hint


@pytest.mark.parametrize("name", ["ptb", "wikitext", "c4 "])
def test_a_set_lmdeploy_does_not_offer_is_refused_before_anything_starts(
    model: Path, tmp_path: Path, name: str
) -> None:
    out = tmp_path / "new" / "w4"
    with pytest.raises(TuichatError) as refused:
        QuantizeJob.start(options(model, out, calib_dataset=name), tmp_path / "q.log")

    message = str(refused.value)
    assert f"'{name}' is not a calibration set lmdeploy offers" in message
    assert "wikitext2, c4, pileval, gsm8k, neuralmagic_calibration, open-platypus, openwebtext" in message
    assert "--calib-file" in message and "--calib-history" in message and "--calib-samples 0" in message
    assert ("dropped the tutorial's ptb" in message) == (name == "ptb")
    assert not (tmp_path / "new").exists() and not (tmp_path / "q.log").exists()


def test_the_cli_refuses_ptb_with_a_sentence(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", str(model), "--out", str(tmp_path / "w4"), "--calib-dataset", "ptb"])

    err = capsys.readouterr().err
    assert code != 0
    assert "lmdeploy 0.18 dropped the tutorial's ptb" in err and "Traceback" not in err
    assert not (tmp_path / "w4").exists()


def test_a_named_set_on_a_machine_without_datasets_or_hub_offers_the_offline_routes(
    model: Path, tmp_path: Path
) -> None:
    no_datasets = Probes(**{**vars(ONLINE), "has_module": lambda python, name: False})
    with pytest.raises(TuichatError, match="'datasets' package") as refused:
        QuantizeJob.start(options(model, tmp_path / "w4"), tmp_path / "q.log", probes=no_datasets)
    assert "--calib-file PATH" in str(refused.value) and "--calib-samples 0" in str(refused.value)

    no_hub = Probes(**{**vars(OFFLINE), "has_module": lambda python, name: True})
    with pytest.raises(TuichatError, match="cannot reach") as refused:
        QuantizeJob.start(options(model, tmp_path / "w4", calib_dataset="c4"), tmp_path / "q.log", probes=no_hub)
    assert "The c4 calibration set" in str(refused.value) and "--calib-history" in str(refused.value)
    assert not (tmp_path / "w4").exists()

    # a set already in the Hugging Face cache loads without the hub
    cached = Probes(**{**vars(OFFLINE), "has_module": lambda p, n: True, "dataset_cached": lambda n: n == "c4"})
    job = QuantizeJob.start(options(model, tmp_path / "w4", calib_dataset="c4"), tmp_path / "q.log", probes=cached)
    assert job.wait(timeout=20).state == "done"
    assert any("cached copy of c4" in note for note in job.notes)


def test_local_text_calibrates_through_tuichats_entry_without_a_hub(model: Path, tmp_path: Path, site: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "w4"
    opts = options(model, out, calib_file=text_file, calib_samples=8, calib_seqlen=512, trust_remote_code=True)
    argv = build_argv(opts, out, text_file)
    assert argv[:3] == [sys.executable, "-m", "tuichat.models.calib_entry"] and "--trust-remote-code" in argv

    job = QuantizeJob.start(opts, tmp_path / "q.log", probes=OFFLINE)  # no datasets, no hub: not needed
    statuses = []
    while not (statuses and statuses[-1].finished):
        statuses.append(job.poll())
        time.sleep(0.01)

    assert statuses[-1].state == "done", (statuses[-1], (tmp_path / "q.log").read_text()[-2000:])
    record = calib_record(out)
    assert record["loader"] == "__main__.get_calib_loaders"  # the entry's (run as __main__), not the hub one
    assert (record["samples"], record["seqlen"], record["dtype"]) == (8, 512, "int64")
    assert isinstance(record["first"], str) and len(record["first"]) == 512 and record["first"] in TEXT
    assert record["trust_remote_code"] is True
    log = (tmp_path / "q.log").read_text()
    assert "8 samples of 512 tokens" in log and "datasets" not in log
    assert any(s.phase == "calibrating" and s.layers_done for s in statuses)
    assert job.make_profile()[1].model_format == "awq"
    assert find_orphan_jobs() == []  # a finished job leaves no record


def test_a_folder_of_text_files_and_jsonl_chats_is_read(model: Path, tmp_path: Path, site: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Notes\n" + TEXT[:3000])
    lines = [json.dumps({"messages": [{"role": "user", "content": "harbour " * 200}]}) for _ in range(3)]
    (folder / "sub" / "chats.jsonl").write_text("\n".join(lines))
    (folder / "skip.bin").write_bytes(b"\0" * 10_000)
    out = tmp_path / "w4"

    job = QuantizeJob.start(
        options(model, out, calib_file=folder, calib_samples=4, calib_seqlen=1024), tmp_path / "q.log"
    )

    assert job.wait(timeout=20).state == "done", (tmp_path / "q.log").read_text()[-2000:]
    assert calib_record(out)["samples"] == 4


def test_too_little_local_text_is_refused_before_the_job_starts(model: Path, tmp_path: Path, site: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("x" * 5000)
    with pytest.raises(TuichatError) as refused:
        QuantizeJob.start(options(model, tmp_path / "w4", calib_file=small), tmp_path / "q.log")
    assert "has 5000 bytes, so at most 5000 tokens, enough for 4 samples of 1024 tokens, but 128 were asked" in str(
        refused.value
    )
    assert "lower --calib-samples to 4" in str(refused.value)
    assert not (tmp_path / "w4").exists()

    # the bound counts bytes, not characters: 3000 two-byte characters are enough for 5 samples of 1024
    small.write_text("é" * 3000)
    job = QuantizeJob.start(options(model, tmp_path / "w4", calib_file=small, calib_samples=5), tmp_path / "q.log")
    assert job.wait(timeout=20).state == "done"


def test_the_entry_refuses_a_missing_or_odd_calibration_file(model: Path, tmp_path: Path) -> None:
    with pytest.raises(TuichatError, match="no calibration file or folder at"):
        QuantizeJob.start(options(model, tmp_path / "w4", calib_file=tmp_path / "nope.txt"), tmp_path / "q.log")
    (tmp_path / "data.csv").write_text("a,b\n" * 100_000)
    with pytest.raises(TuichatError, match=r"not a \.txt, \.md or \.jsonl file"):
        QuantizeJob.start(options(model, tmp_path / "w4", calib_file=tmp_path / "data.csv"), tmp_path / "q.log")
    with pytest.raises(TuichatError, match="either --calib-file or --calib-history"):
        QuantizeJob.start(
            options(model, tmp_path / "w4", calib_file=tmp_path / "data.csv", calib_history=True), tmp_path / "q.log"
        )


def seed_history(chats: int, reply: str) -> None:
    with Store.open() as store:
        for n in range(chats):
            conv = store.create_conversation(model="tiny-chat")
            store.add_message(conv, "user", f"Question {n}: tell me about the harbour \x1b[31min red\x1b[0m?")
            store.add_message(conv, "assistant", reply)
            store.add_message(conv, "error", "SECRET-ERROR-TEXT the server went away")


def test_history_calibration_uses_the_saved_conversations_in_a_private_temp_file(
    model: Path, tmp_path: Path, site: Path
) -> None:
    seed_history(6, TEXT[:2000])
    out = tmp_path / "w4"
    opts = options(model, out, calib_history=True, calib_samples=8, calib_seqlen=1024)

    job = QuantizeJob.start(opts, tmp_path / "q.log", probes=OFFLINE)
    temp = job._calib_temp
    assert temp is not None and temp.is_file()
    assert temp.stat().st_mode & 0o777 == 0o600
    written = temp.read_text()
    assert "Question 5: tell me about the harbour in red?" in written  # control sequences stripped
    assert "SECRET-ERROR-TEXT" not in written  # only user and assistant turns

    assert job.wait(timeout=20).state == "done", (tmp_path / "q.log").read_text()[-2000:]
    assert calib_record(out)["first"] in written
    assert not temp.exists()  # the conversations do not outlive the job
    assert "your saved conversations" in job.summary(None)[0]


def test_history_with_too_little_text_is_refused_with_a_sentence(model: Path, tmp_path: Path) -> None:
    opts = options(model, tmp_path / "w4", calib_history=True, calib_samples=64, calib_seqlen=512)
    with pytest.raises(TuichatError, match="no saved conversations"):
        QuantizeJob.start(opts, tmp_path / "q.log")
    seed_history(2, "A short answer.")
    with pytest.raises(TuichatError) as refused:
        QuantizeJob.start(opts, tmp_path / "q.log")
    assert str(refused.value).startswith("Your saved conversations has")
    assert "but 64 were asked" in str(refused.value)
    assert not (tmp_path / "w4").exists()
    assert not list((tmp_path / "tuichat-home").rglob("calib-history-*"))


def test_data_free_needs_nothing_and_says_it_costs_quality(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(quantize, "DEFAULT_PROBES", OFFLINE)
    out = tmp_path / "w4"
    code = main(
        ["quantize", str(model), "--out", str(out), "--calib-samples", "0", "--lmdeploy", f"{sys.executable} {FAKE}"]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "calibration: no data (data-free, lower quality)" in captured.out
    assert "note: Data-free quantization" in captured.out
    assert "Quantized data-free (no calibration)" in captured.out
    assert "Loading calibrate dataset" not in (
        paths_log := "\n".join(p.read_text() for p in (tmp_path / "tuichat-home").rglob("*.log"))
    )
    assert "--calib-samples 0" in paths_log
    assert not (out / "inputs_stats.pth").exists()
    assert load_config().profiles["w4"].model_format == "awq"


def test_the_cli_calibrates_on_a_file_and_prints_sizes_and_fit_of_both(
    model: Path, tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_weights(model, 4_000_000)  # 8 MB of bf16
    gpu = GpuInfo(0, "NVIDIA H200", "GPU-0", mem_used=1 * GB, mem_total=140 * GB)
    probes = Probes(**{**vars(OFFLINE), "gpu_snapshot": lambda: GpuSnapshot(0.0, (gpu,))})
    monkeypatch.setattr(quantize, "DEFAULT_PROBES", probes)
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "tiny-w4"

    code = main(
        [
            "quantize",
            str(model),
            "--out",
            str(out),
            "--calib-file",
            str(text_file),
            "--calib-samples",
            "4",
            "--calib-seqlen",
            "256",
            "--lmdeploy",
            f"{sys.executable} -m lmdeploy",
        ]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"calibration: local text ({text_file})" in captured.out
    assert "Weights: 8.0 MB before, " in captured.out and "after (" in captured.out
    assert "Fit of the original model on GPU 0: weights 8.0 MB" in captured.out
    assert "Fit of the quantized model on GPU 0: weights " in captured.out
    assert 'backend = "pytorch"' in captured.out
    assert load_config().profiles["tiny-w4"].model_format == "awq"


# ---------------------------------------------------------------- preflight


@pytest.mark.parametrize(
    ("changes", "group", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, 128, "its architecture (GPT2LMHeadModel)"),
        ({"intermediate_size": 688}, 128, "does not divide the model's intermediate_size 688"),
        ({"hidden_size": 320, "intermediate_size": 640}, 128, "use --group-size 64"),
    ],
)
def test_preflight_refuses_a_model_auto_awq_cannot_quantize(
    model: Path, tmp_path: Path, changes: dict[str, object], group: int, message: str
) -> None:
    (model / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    with pytest.raises(TuichatError, match=re.escape(message)):
        QuantizeJob.start(options(model, tmp_path / "w4", group_size=group), tmp_path / "q.log")
    assert not (tmp_path / "w4").exists()


def test_preflight_refuses_a_full_disk_or_a_busy_gpu(model: Path, tmp_path: Path) -> None:
    write_weights(model, 50_000_000)
    full = Probes(**{**vars(ONLINE), "disk_free": lambda path: 1_000_000})
    with pytest.raises(TuichatError, match=r"of disk, but .* has 1\.0 MB free"):
        QuantizeJob.start(options(model, tmp_path / "w4"), tmp_path / "q.log", probes=full)

    busy_gpu = GpuInfo(0, "NVIDIA H200", "GPU-0", mem_used=139 * GB + 800_000_000, mem_total=140 * GB)
    busy = Probes(**{**vars(ONLINE), "gpu_snapshot": lambda: GpuSnapshot(0.0, (busy_gpu,))})
    with pytest.raises(TuichatError, match=r"GPU memory, but GPU 0 .* has 200\.0 MB free") as refused:
        QuantizeJob.start(options(model, tmp_path / "w4"), tmp_path / "q.log", probes=busy)
    assert "lower --calib-samples" in str(refused.value)
    assert not (tmp_path / "w4").exists()


# ---------------------------------------------------------------- a tuichat that died mid-job


def test_a_job_left_by_a_killed_tuichat_is_found_and_cleaned_up_on_the_next_start(
    model: Path, tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_file = tmp_path / "calib.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "w4"
    cli = _hanging_quantize_cli(model, out, text_file, site)
    assert cli.stdout is not None
    job_pid = int(cli.stdout.readline().split("(pid ")[1].split(")")[0])
    for line in cli.stdout:
        if "calibrating: 1 of" in line:
            break
    cli.kill()  # tuichat dies; the job runs on in its own session
    cli.communicate(timeout=10)
    assert group_pids(job_pid)
    assert leftovers(tmp_path)

    orphans = find_orphan_jobs()
    assert len(orphans) == 1 and orphans[0].pid == job_pid and orphans[0].running
    assert "started" in orphans[0].describe() and "is still running" in orphans[0].describe()

    code = main(["quantize", str(model), "--out", str(out), "--yes", "--calib-dataset", "ptb"])  # refused later
    captured = capsys.readouterr()
    assert code != 0
    assert "by a tuichat that has ended, is still running" in captured.err
    assert "Cleaned up: stopped the job" in captured.out
    wait_for(lambda: not group_pids(job_pid))
    assert leftovers(tmp_path) == []
    assert find_orphan_jobs() == []
