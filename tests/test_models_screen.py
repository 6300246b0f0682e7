"""The model picker driven with Pilot: model folders made in tmp_path, caches and HOME pointed there too.

A FakeGpuReader stands for the GPU, so the fit sentence is known in advance; tests/fake_lite.py stands for
`lmdeploy lite auto_awq` when a test quantizes from the picker.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apphelpers import screen_text, wait_for
from fakegpu import FakeGpuReader
from standin import hub as hubstandin
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Input, Static

from tuichat.config import add_profile, load_config
from tuichat.models.quantize import Probes, default_record_dir, find_orphan_jobs
from tuichat.server.gpu import GpuInfo
from tuichat.server.procgroup import group_pids, process_start_ticks, spawn_group
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.models import ModelsResult, ModelsScreen, ModelsTable, column_widths
from tuichat.ui.screens.pull import PullScreen
from tuichat.ui.screens.quantize import QuantizeScreen

GB = 1000**3
FAKE = Path(__file__).with_name("fake_lite.py")
QWEN = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "torch_dtype": "bfloat16",
}
AWQ = {**QWEN, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}, "torch_dtype": "float16"}
VLM = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    **{k: v for k, v in QWEN.items() if k not in ("architectures", "model_type")},
    "vision_config": {"hidden_size": 128, "depth": 2},
}


class Host(App[None]):
    """Pushes the picker and keeps what it dismissed with."""

    def __init__(self, screen: ModelsScreen) -> None:
        super().__init__()
        self.picker = screen
        self.results: list[ModelsResult | None] = []

    def on_mount(self) -> None:
        self.push_screen(self.picker, self.results.append)


def write_weights(path: Path, rows: int = 64, cols: int = 64) -> None:
    """A real safetensors file holding one bf16 matrix of zeros."""
    size = rows * cols * 2
    header = json.dumps({"w.weight": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, size]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * size)


def make_model(folder: Path, config: dict[str, Any], weights: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    if weights:
        write_weights(folder / "model.safetensors")
    return folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    for key in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    return folder


@pytest.fixture
def root(home: Path, hermetic_home: Path) -> Path:
    """A model root in config.toml holding a plain, an AWQ, a vision-language and a broken model."""
    folder = home / "models"
    make_model(folder / "tiny-chat", QWEN)
    make_model(folder / "tiny-awq", AWQ)
    make_model(folder / "tiny-vl", VLM)
    broken = folder / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": [')
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text(f'[models]\nroots = ["{folder}"]\n')
    return folder


def gpu(used: int = 10 * GB, total: int = 150 * GB) -> FakeGpuReader:
    return FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=used, mem_total=total)])


def picker(reader: FakeGpuReader | None = None, **kwargs: Any) -> tuple[Host, ModelsScreen]:
    screen = ModelsScreen(load_config(), reader or gpu(), **kwargs)
    return Host(screen), screen


async def scanned(pilot: Pilot[Any], screen: ModelsScreen) -> None:
    await wait_for(pilot, lambda: pilot.app.screen is screen and screen.result is not None)
    await wait_for(pilot, lambda: screen.snapshot is not None)
    await pilot.pause()


async def highlight(pilot: Pilot[Any], screen: ModelsScreen, name: str) -> None:
    index = [m.name for m in screen.models].index(name)
    screen.query_one(ModelsTable).move_cursor(row=index)
    await pilot.pause()
    current = screen.current_model()
    assert current is not None and current.name == name


def detail(screen: ModelsScreen) -> str:
    return str(screen.query_one("#mdl-detail", Static).render())


def message(screen: ModelsScreen) -> str:
    return str(screen.query_one("#mdl-message", Static).render())


async def test_models_are_listed_with_their_facts_and_problems_below(root: Path, home: Path) -> None:
    snapshot = make_model(home.parent / "hf" / "hub" / "models--org--Cached-7B" / "snapshots" / "abc", QWEN)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        assert [m.name for m in screen.models] == ["org/Cached-7B", "tiny-awq", "tiny-chat", "tiny-vl"]
        text = screen_text(app)
        assert "Local models · 4" in text
        assert "searched ~/models" in text
        lines = {line.split()[0]: line for line in text.splitlines() if line.strip()[:4] in ("tiny", "org/")}
        assert "Qwen2ForCausalLM" in lines["tiny-chat"] and "bfloat16" in lines["tiny-chat"]
        assert "awq w4" in lines["tiny-awq"] and "float16" in lines["tiny-awq"]
        assert lines["tiny-vl"].rstrip().endswith("yes")  # the VLM column
        assert lines["tiny-chat"].rstrip().endswith("-")
        assert "4.1K" in lines["tiny-chat"]  # 64 x 64 parameters in the safetensors header
        # the broken folder is a sentence under the table, not a row and not a crash
        assert "~/models/broken/config.json is not valid JSON" in text
        assert "fetch the model again" in str(screen.query_one("#mdl-problems", Static).render())


async def test_the_fit_sentence_speaks_of_free_memory_and_the_cache_share(root: Path) -> None:
    app, screen = picker(gpu(used=10 * GB, total=150 * GB))
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-chat")
        text = detail(screen)
        assert "Fit on GPU 0 (Fake H200, 140.0 GB free of 150.0 GB)" in text
        assert "KV cache gets about 112.0 GB at 0.8" in text and "fits." in text
        await highlight(pilot, screen, "tiny-awq")  # its profile asks for the tutorial's 0.4
        text = detail(screen)
        assert "KV cache gets about 56.0 GB at 0.4" in text
        assert "model_format = awq" in text and "AWQ 4-bit weights" in text
        await highlight(pilot, screen, "tiny-vl")
        assert "Vision-language model" in detail(screen)


async def test_weights_larger_than_the_gpu_do_not_fit(root: Path) -> None:
    big = make_model(root / "huge", QWEN, weights=False)
    with (big / "pytorch_model.bin").open("wb") as fh:
        fh.truncate(200 * GB)  # sparse: takes no disk space, but its size is that of a 100B model
    app, screen = picker(gpu(used=1 * GB, total=150 * GB))
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "huge")
        text = detail(screen)
        assert "weights 200.0 GB need more than the GPU's 150.0 GB; does not fit" in text
        assert "use a quantized (AWQ) model" in text


async def test_without_a_gpu_it_says_so_and_still_makes_profiles(root: Path) -> None:
    reader = FakeGpuReader(error="no NVIDIA GPU visible: driver not loaded")
    app, screen = picker(reader)
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-chat")
        text = detail(screen)
        assert "no estimate" in text and "driver not loaded" in text and "A profile can still be made" in text
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.query_one("#mdl-name", Input).has_focus)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("tiny-chat")])
    assert load_config().profiles["tiny-chat"].model == str(root / "tiny-chat")


async def test_enter_on_an_awq_model_makes_an_awq_profile(root: Path) -> None:
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-awq")
        await pilot.press("enter")
        field = screen.query_one("#mdl-name", Input)
        await wait_for(pilot, lambda: field.has_focus)
        assert field.value == "tiny-awq"
        assert "A new profile for tiny-awq" in message(screen)
        assert "AWQ 4-bit weights" in screen_text(app)  # the profile notes
        await pilot.press("ctrl+u", *"my-awq", "enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("my-awq")])
    profile = load_config().profiles["my-awq"]
    assert profile.model == str(root / "tiny-awq")
    assert profile.model_format == "awq"
    assert profile.cache_max_entry_count == 0.4


async def test_a_vision_model_gets_the_longer_session_and_esc_cancels_naming(root: Path) -> None:
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-vl")
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.naming is not None)
        await pilot.press("escape")  # back to the list, nothing saved
        await wait_for(pilot, lambda: screen.naming is None and screen.query_one(ModelsTable).has_focus)
        assert app.results == []
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.query_one("#mdl-name", Input).has_focus)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("tiny-vl")])
    assert load_config().profiles["tiny-vl"].session_len == 16384


async def test_a_typed_hub_id_becomes_a_profile(root: Path) -> None:
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await pilot.press("slash")
        hub = screen.query_one("#mdl-hub", Input)
        await wait_for(pilot, lambda: hub.has_focus)
        await pilot.press(*"not a model", "enter")
        await wait_for(pilot, lambda: "neither a model folder nor a hub id" in message(screen))
        assert screen.naming is None
        hub.value = "internlm/internlm2-chat-1_8b"  # as if pasted
        await wait_for(pilot, lambda: "lmdeploy downloads it at the first start" in detail(screen))
        await pilot.press("enter")
        name = screen.query_one("#mdl-name", Input)
        await wait_for(pilot, lambda: name.has_focus)
        assert name.value == "internlm2-chat-1_8b"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("internlm2-chat-1_8b")])
    assert load_config().profiles["internlm2-chat-1_8b"].model == "internlm/internlm2-chat-1_8b"


async def test_a_taken_name_is_suggested_free_and_replacing_asks(root: Path) -> None:
    add_profile("tiny-chat", {"model": "owner/other"})
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-chat")
        await pilot.press("p")
        field = screen.query_one("#mdl-name", Input)
        await wait_for(pilot, lambda: field.has_focus)
        assert field.value == "tiny-chat-2"
        await pilot.press("ctrl+u", *"tiny-chat", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen)
        assert load_config().profiles["tiny-chat"].model == "owner/other"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.results == [ModelsResult("tiny-chat")])
    assert load_config().profiles["tiny-chat"].model == str(root / "tiny-chat")


async def test_rescan_finds_a_new_model_and_an_empty_machine_says_what_to_do(home: Path) -> None:
    app, screen = picker()
    async with app.run_test(size=(80, 24)) as pilot:
        await scanned(pilot, screen)
        assert "No local models found" in screen_text(app)
        make_model(home.parent / "ms" / "org" / "Fresh___Model", QWEN)
        await pilot.press("r")
        await wait_for(pilot, lambda: [m.name for m in screen.models] == ["org/Fresh.Model"])
        await pilot.pause()
        assert "org/Fresh.Model" in screen_text(app)


async def test_q_quantizes_the_highlighted_model_and_returns_with_its_profile(root: Path) -> None:
    command = [sys.executable, str(FAKE), "--fake-seconds", "0.2"]
    online = Probes(
        has_module=lambda python, name: True,
        hub_reachable=lambda: True,
        dataset_cached=lambda name: False,
        gpu_snapshot=lambda: None,
        disk_free=lambda path: 10**15,
    )
    app, screen = picker(quantize_command=command, quantize_probes=online)
    async with app.run_test(size=(100, 30)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-awq")
        await pilot.press("q")  # already quantized: refused with a reason
        await wait_for(pilot, lambda: "already quantized" in message(screen))
        await highlight(pilot, screen, "tiny-chat")
        await pilot.press("q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuantizeScreen))
        form = app.screen
        assert isinstance(form, QuantizeScreen)
        assert form.query_one("#qz-model", Input).value == "~/models/tiny-chat"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: form.state in ("done", "failed"), timeout=20)
        assert form.state == "done"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("tiny-chat-awq-w4")])
    assert load_config().profiles["tiny-chat-awq-w4"].model_format == "awq"


def test_column_widths_fill_the_table_and_keep_short_columns_whole() -> None:
    rows = [
        {
            "name": "internlm/internlm2-chat-1_8b",
            "arch": "InternLM2ForCausalLM",
            "params": "1.9B",
            "dtype": "bfloat16",
            "quant": "-",
            "size": "3.8 GB",
            "vlm": "-",
        }
    ]
    widths = column_widths(rows, 79)
    assert sum(widths.values()) + 14 == 79
    assert widths["dtype"] == 8 and widths["size"] == 6 and widths["vlm"] == 3
    wide = column_widths(rows, 119)
    assert wide["name"] >= len(rows[0]["name"]) and wide["arch"] == len(rows[0]["arch"])


def leave_an_orphan_job(tmp_path: Path) -> tuple[int, Path]:
    """What a tuichat killed mid-quantize leaves: a running job group, its staging folder, its record."""
    staging = tmp_path / "models" / ".tiny-chat-awq-w4.partial-abcd1234"
    staging.mkdir(parents=True)
    (staging / "inputs_stats.pth").write_bytes(b"partial")
    job = spawn_group([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "job.log")
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()  # the tuichat that started the job, now gone
    record = {
        "pid": job.pid,
        "start_ticks": process_start_ticks(job.pid),
        "owner_pid": owner.pid,
        "owner_ticks": None,
        "started": time.time(),
        "staging": str(staging),
        "out": str(tmp_path / "models" / "tiny-chat-awq-w4"),
        "model": str(tmp_path / "models" / "tiny-chat"),
    }
    default_record_dir().mkdir(parents=True, exist_ok=True)
    (default_record_dir() / f"job-{job.pid}-000000.json").write_text(json.dumps(record))
    return job.pid, staging


async def test_a_job_left_by_a_dead_tuichat_is_offered_for_clean_up(tmp_path: Path, root: Path) -> None:
    pid, staging = leave_an_orphan_job(tmp_path)
    app, screen = picker()
    async with app.run_test(size=(100, 30)) as pilot:
        # the question is drawn a frame after the screen is pushed: wait for its text, not only the screen
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen) and "started" in screen_text(app))
        question = screen_text(app)
        assert "started" in question and "by a tuichat that has ended, is still running" in question
        await pilot.press("y")
        await wait_for(pilot, lambda: "Cleaned up: stopped the job" in message(screen), timeout=20)
    assert not group_pids(pid)
    assert not staging.exists()
    assert find_orphan_jobs() == []


async def test_declining_the_clean_up_leaves_the_job_for_next_time(tmp_path: Path, root: Path) -> None:
    pid, staging = leave_an_orphan_job(tmp_path)
    try:
        app, screen = picker()
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("n")
            await wait_for(pilot, lambda: "offered again next time" in message(screen))
        assert group_pids(pid) and staging.exists()
        assert [o.pid for o in find_orphan_jobs()] == [pid]
    finally:
        for orphan in find_orphan_jobs():
            orphan.clean_up(timeout=2.0)


async def test_a_vision_model_says_which_image_size_fits_its_profile_session(root: Path) -> None:
    pre = {"min_pixels": 56 * 56, "max_pixels": 448 * 448, "patch_size": 14, "merge_size": 2}
    (root / "tiny-vl" / "preprocessor_config.json").write_text(json.dumps(pre))
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-vl")
        text = " ".join(detail(screen).split())
        assert "session_len = 16384" in text
        assert "Images up to 448x448 (~258 tokens each) fit a 16,384-token session" in text
        await highlight(pilot, screen, "tiny-chat")
        assert "Images up to" not in detail(screen)


# ---------------------------------------------------------------- get a model (against the stand-in hub)


@pytest.fixture
def hub_factory(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Starts stand-in hubs with the given switches; HF_ENDPOINT points at the last, no token, small chunks."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # progress in several steps
    started: list[hubstandin.HubProcess] = []

    def start(*args: str) -> hubstandin.HubProcess:
        hub = hubstandin.start(tmp_path / f"hub{len(started)}.log", *args)
        started.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub

    yield start
    for hub in started:
        hub.stop()


def pulled_snapshot(home: Path) -> Path:
    return home.parent / "hf" / "hub" / "models--tiny--tiny-chat" / "snapshots" / hubstandin.COMMIT


def pull_screen(app: Host) -> PullScreen:
    assert isinstance(app.screen, PullScreen)
    return app.screen


def pull_text(app: Host) -> str:
    return " ".join(screen_text(app).split())


async def test_g_gets_a_model_shows_its_facts_and_fit_and_p_makes_its_profile(
    root: Path, home: Path, hub_factory: Any
) -> None:
    hub = hub_factory()
    app, screen = picker()
    async with app.run_test(size=(100, 30)) as pilot:
        await scanned(pilot, screen)
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen))
        form = pull_screen(app)
        await wait_for(pilot, lambda: form.query_one("#pull-repo", Input).has_focus)
        await pilot.press("enter")  # nothing typed: a sentence, no pull
        await wait_for(pilot, lambda: "Give a hub id as owner/name" in pull_text(app))
        await pilot.press(*"tiny/tiny-chat", "enter")
        await wait_for(pilot, lambda: form.state == "done", timeout=20)
        await wait_for(pilot, lambda: "p makes a launch profile" in pull_text(app))
        text = pull_text(app)
        assert "tiny/tiny-chat is here" in text and "checked against the hub's hashes" in text
        assert "model.safetensors: 256.2 kB" in text and "sha256 ok" in text
        assert "architecture: Qwen2ForCausalLM" in text and "dtype bfloat16" in text
        assert "(AWQ: no), vision-language: no" in text
        assert "Fit on GPU 0 (Fake H200, 140.0 GB free of 150.0 GB)" in text and "fits." in text
        assert "(100%)" in text
        await pilot.press("p")
        name = screen.query_one("#mdl-name", Input)
        await wait_for(pilot, lambda: app.screen is screen and name.has_focus)
        assert name.value == "tiny-chat"
        assert "A new profile for tiny/tiny-chat" in message(screen)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == [ModelsResult("tiny-chat")])
    assert load_config().profiles["tiny-chat"].model == str(pulled_snapshot(home))
    assert len(hub.downloads()) == 3


async def test_esc_stops_a_pull_keeping_the_part_and_enter_resumes_it_with_a_range_request(
    root: Path, home: Path, hub_factory: Any
) -> None:
    hub = hub_factory("--rate", "100000")  # the 256 kB weights take about 2.5 s
    app, screen = picker()
    async with app.run_test(size=(100, 30)) as pilot:
        await scanned(pilot, screen)
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen))
        form = pull_screen(app)
        await pilot.press(*"tiny/tiny-chat", "enter")
        await wait_for(
            pilot,
            lambda: form.view is not None and form.view.name == "model.safetensors" and form.view.file_have >= 32768,
            timeout=20,
        )
        assert "[2/3] model.safetensors" in pull_text(app) and "left" in pull_text(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: form.state == "stopped", timeout=20)
        # the sentence is drawn on the frame after the state changes: wait for it, not for the state alone
        await wait_for(pilot, lambda: "Press Enter to go on" in pull_text(app))
        text = pull_text(app)
        assert "1 of 3 files of tiny/tiny-chat are in the cache" in text
        assert "fetched so far are kept and resume" in text and "Press Enter to go on" in text
        weights = pulled_snapshot(home) / "model.safetensors"
        assert not weights.exists() and not (pulled_snapshot(home) / "config.json").exists()
        [part] = list((home.parent / "hf" / "hub").rglob("*.incomplete"))
        kept = part.stat().st_size
        assert kept > 0
        assert screen.models and all(m.hub_id != "tiny/tiny-chat" for m in screen.models)
        await pilot.press("enter")
        await wait_for(pilot, lambda: form.state == "done", timeout=20)
        await wait_for(pilot, lambda: f"resuming model.safetensors at {kept / 1000:.1f} kB" in pull_text(app))
        await pilot.press("escape")  # done: back to the list, which now has the model
        await wait_for(pilot, lambda: app.screen is screen)
        await wait_for(pilot, lambda: "tiny/tiny-chat" in [m.name for m in screen.models])
    ranges = [r["range"] for r in hub.downloads() if str(r["path"]).endswith("model.safetensors")]
    assert ranges == [None, f"bytes={kept}-"]
    assert weights.is_file()


async def test_an_unknown_repo_says_so_and_esc_goes_back(root: Path, home: Path, hub_factory: Any) -> None:
    hub_factory()
    app, screen = picker()
    async with app.run_test(size=(100, 30)) as pilot:
        await scanned(pilot, screen)
        await pilot.press("g")
        await wait_for(pilot, lambda: isinstance(app.screen, PullScreen))
        form = pull_screen(app)
        await pilot.press(*"tiny/nope", "enter")
        await wait_for(pilot, lambda: form.state == "failed", timeout=20)
        assert "tiny/nope was not found on http://127.0.0.1" in pull_text(app)
        assert form.query_one("#pull-repo", Input).has_focus  # fix the id and try again
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)
    assert app.results == []


async def test_a_taken_profile_name_is_asked_about_and_no_keeps_the_old_profile(root: Path) -> None:
    # The one "replace that profile?" step (the profile editor's and the quantize screen's) guards this save too.
    from tuichat.config import add_profile
    from tuichat.ui.screens.dialogs import ConfirmScreen

    add_profile("mine", {"model": "org/kept-model"})
    app, screen = picker()
    async with app.run_test(size=(120, 40)) as pilot:
        await scanned(pilot, screen)
        await highlight(pilot, screen, "tiny-awq")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.query_one("#mdl-name", Input).has_focus)
        await pilot.press("ctrl+u", *"mine", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "A profile called mine is already in config.toml: replace it?" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is screen)
        assert app.results == []
        assert load_config().profiles["mine"].model == "org/kept-model"
        await pilot.press("enter")  # asked again, and yes replaces it
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.results == [ModelsResult("mine")])
    assert load_config().profiles["mine"].model == str(root / "tiny-awq")
