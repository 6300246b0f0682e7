"""The quantize form driven with Pilot, running tests/fake_lite.py in place of `lmdeploy lite auto_awq`.

Each test hosts the screen in a tiny app and presses what a user would press; the fake prints lmdeploy's own
progress lines, keeps a worker process in its group, and fails or hangs on request. Every test checks what is
left on disk and in the process table, because a cancelled or failed run must leave neither.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import fake_lite
import pytest
from apphelpers import screen_text, wait_for
from fakegpu import FakeGpuReader
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Input, ProgressBar, Select, Static

from tuichat.chat.store import Store
from tuichat.config import load_config
from tuichat.models.quantize import Probes
from tuichat.server.gpu import GpuInfo
from tuichat.server.procgroup import group_pids
from tuichat.server.profiles import parse_profile
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.quantize import CALIB_CHOICES, QuantizeScreen, default_output, model_base_name

FAKE = Path(__file__).with_name("fake_lite.py")
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


GB = 1000**3
# a machine with `datasets` and a hub, and plenty of disk; GPU memory is read through the screen's reader
ONLINE = Probes(
    has_module=lambda python, name: True,
    hub_reachable=lambda: True,
    dataset_cached=lambda name: False,
    gpu_snapshot=lambda: None,
    disk_free=lambda path: 10**15,
)
OFFLINE = Probes(
    **{**vars(ONLINE), "has_module": lambda python, name: name != "datasets", "hub_reachable": lambda: False}
)
GPU = FakeGpuReader([GpuInfo(0, "NVIDIA H200", "GPU-0", mem_used=1 * GB, mem_total=140 * GB)])


class Host(App[None]):
    """Pushes the quantize screen and keeps what it dismissed with."""

    def __init__(self, screen: QuantizeScreen) -> None:
        super().__init__()
        self.form = screen
        self.results: list[str | None] = []

    def on_mount(self) -> None:
        self.push_screen(self.form, self.results.append)


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
def model(home: Path) -> Path:
    folder = home / "models" / "tiny-chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def fake(*switches: str) -> list[str]:
    return [sys.executable, str(FAKE), "--fake-seconds", "0.3", *switches]


def form(model: Path | str, *switches: str, probes: Probes = ONLINE) -> tuple[Host, QuantizeScreen]:
    screen = QuantizeScreen(load_config(), str(model), command=fake(*switches), probes=probes, gpu_reader=GPU)
    screen.cancel_timeout = 1.0  # the fake's worker ignores SIGINT: SIGTERM follows after half of this
    return Host(screen), screen


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def message_text(screen: QuantizeScreen) -> str:
    return str(screen.query_one("#qz-message", Static).render())


async def opened(pilot: Pilot[Any], screen: QuantizeScreen) -> None:
    await wait_for(pilot, lambda: pilot.app.screen is screen)
    await pilot.pause()


async def test_the_form_is_prefilled_beside_the_model(model: Path) -> None:
    app, screen = form(model)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        assert screen.query_one("#qz-model", Input).value == "~/models/tiny-chat"
        assert screen.query_one("#qz-out", Input).value == "~/models/tiny-chat-awq-w4"
        assert screen.query_one("#qz-profile", Input).value == "tiny-chat-awq-w4"
        assert "wikitext2" in screen_text(app)
        # an output name nobody typed over follows the bit width
        bits = screen.query_one("#qz-bits", Input)
        bits.value = "8"
        await pilot.pause()
        assert screen.query_one("#qz-out", Input).value == "~/models/tiny-chat-awq-w8"
        assert screen.query_one("#qz-profile", Input).value == "tiny-chat-awq-w8"


def test_default_output_of_hub_cache_models_and_hub_ids_goes_under_the_first_root(home: Path) -> None:
    snapshot = home.parent / "hf" / "hub" / "models--org--Big-Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert model_base_name(str(snapshot)) == "Big-Model"
    assert default_output(str(snapshot), ["/data/models"]) == Path("/data/models/Big-Model-awq-w4")
    assert default_output("org/Other", ["/data/models"], 8) == Path("/data/models/Other-awq-w8")
    assert default_output("org/Other", []) == home / "models" / "Other-awq-w4"


async def test_success_shows_progress_and_saves_an_awq_profile(model: Path) -> None:
    app, screen = form(model, "--fake-seconds", "2.5")  # each pass over the layers outlasts a poll
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("ctrl+s")
        seen: list[str] = []
        fractions: list[float] = []

        def finished() -> bool:
            seen.append(screen.state_line().plain)
            bar = screen.query_one(ProgressBar)
            if bar.display and bar.percentage is not None:
                fractions.append(bar.percentage)
            return screen.state in ("done", "failed")

        await wait_for(pilot, finished, timeout=20)
        assert screen.state == "done", message_text(screen)
        assert any("calibrating · layers" in line and "of 6" in line for line in seen)
        assert any("smoothing · layers" in line or "quantizing · layers" in line for line in seen)
        assert any(0 < f < 1 for f in fractions) and fractions[-1] == 1
        text = screen_text(app)
        assert "done · layers 6 of 6" in text
        assert "Saved profile tiny-chat-awq-w4" in text
        assert any("Move model.layers.5 to CPU." in line for line in screen.lines)  # the log on view
        out = model.parent / "tiny-chat-awq-w4"
        assert (out / "config.json").is_file()
        assert leftovers(model.parent) == []
        assert screen.job is not None and group_pids(screen.job.pid) == set()
        profile = load_config().profiles["tiny-chat-awq-w4"]
        assert profile.model == str(out)
        assert profile.model_format == "awq"
        assert profile.cache_max_entry_count == 0.4
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.results == ["tiny-chat-awq-w4"])


async def test_a_failed_download_gives_the_reason_and_a_hint_never_a_traceback(model: Path) -> None:
    app, screen = form(model, "--fake-fail", "download")
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.state == "failed", timeout=20)
        await pilot.pause()
        message = message_text(screen)
        assert "quantization failed: ConnectionError: Couldn't reach 'wikitext2'" in message
        assert "calibration data (wikitext2) must be downloaded" in message  # the hint
        assert "--calib-samples 0" in message
        assert "Traceback" not in message
        assert any("Traceback" in line for line in screen.lines)  # it stays in the log view
        last = [line for line in screen.log_view.kept if line.strip()][-1]
        assert "ConnectionError" in last, last  # the error is the last line, and on view: the log follows its end
        await wait_for(pilot, lambda: screen.log_view.scroll_y == screen.log_view.max_scroll_y)
        assert not (model.parent / "tiny-chat-awq-w4").exists()
        assert leftovers(model.parent) == []
        assert "tiny-chat-awq-w4" not in load_config().profiles
        # the form is open again for another try
        assert not screen.query_one("#qz-samples", Input).disabled


async def test_an_unreachable_hub_id_says_so(home: Path) -> None:
    app, screen = form("someone/not-here")
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        assert screen.query_one("#qz-out", Input).value == "~/models/not-here-awq-w4"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.state == "failed", timeout=20)
        message = message_text(screen)
        assert "is not a local folder, so lmdeploy tried to download it" in message
        assert not (home / "models").exists()  # the job removes the parent folders it made


async def test_a_wrong_value_is_refused_before_anything_starts(model: Path) -> None:
    app, screen = form(model)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        screen.query_one("#qz-group", Input).value = "100"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "power of two" in message_text(screen))
        assert screen.state == "idle" and screen.job is None
        screen.query_one("#qz-group", Input).value = "128"
        screen.query_one("#qz-profile", Input).value = "no spaces"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "cannot be a profile name" in message_text(screen))
        assert screen.state == "idle" and screen.job is None


async def test_a_taken_profile_name_is_replaced_only_after_yes(model: Path) -> None:
    config = load_config()
    config.path.parent.mkdir(parents=True, exist_ok=True)
    config.path.write_text('[profiles.mine]\nmodel = "org/old-model"\nsession_len = 4096\n')
    app, screen = form(model)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        screen.query_one("#qz-profile", Input).value = "mine"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "mine is already in config.toml: replace it?" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: "Not started: mine is kept as it was" in message_text(screen))
        assert screen.state == "idle" and screen.job is None
        assert load_config().profiles["mine"].model == "org/old-model"
        assert not (model.parent / "tiny-chat-awq-w4").exists()

        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.state in ("done", "failed"), timeout=20)
        assert screen.state == "done", message_text(screen)
        assert "Saved profile mine" in screen_text(app)
        mine = load_config().profiles["mine"]
        assert (mine.model, mine.model_format, mine.session_len) == (
            str(model.parent / "tiny-chat-awq-w4"),
            "awq",
            None,
        )


async def test_cancel_stops_every_process_and_leaves_no_partial_folder(model: Path) -> None:
    app, screen = form(model, "--fake-hang")
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.status is not None and screen.status.layers_done >= 1, timeout=20)
        job = screen.job
        assert job is not None and len(group_pids(job.pid)) >= 2  # the fake and its worker
        assert leftovers(model.parent)  # the staging folder exists while it runs
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.state == "cancelled", timeout=20)
        await wait_for(pilot, lambda: "No lmdeploy process is left" in message_text(screen))
        assert group_pids(job.pid) == set()
        assert leftovers(model.parent) == []
        assert not (model.parent / "tiny-chat-awq-w4").exists()
        assert "partial output is removed" in message_text(screen)


async def test_leaving_while_it_runs_asks_and_cancels(model: Path) -> None:
    app, screen = form(model, "--fake-hang")
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.status is not None and screen.status.layers_done >= 1, timeout=20)
        job = screen.job
        assert job is not None
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # keep it running
        await wait_for(pilot, lambda: app.screen is screen)
        assert screen.state == "running" and group_pids(job.pid)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.results == [None], timeout=20)
        assert group_pids(job.pid) == set()
        assert leftovers(model.parent) == []


async def test_an_existing_output_folder_is_replaced_only_after_yes(model: Path) -> None:
    out = model.parent / "tiny-chat-awq-w4"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    app, screen = form(model)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "already exists and is not empty" in screen_text(app)
        await pilot.press("n")
        await wait_for(pilot, lambda: "Not started" in message_text(screen))
        assert screen.job is None and (out / "keep.txt").read_text() == "mine"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.state in ("done", "failed"), timeout=20)
        assert screen.state == "done", message_text(screen)
        assert not (out / "keep.txt").exists()
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
        assert leftovers(model.parent) == []
        parse_profile("tiny-chat-awq-w4", {"model": str(out), "model_format": "awq"}, "config.toml")


TEXT = "The harbour filled with gulls, fishermen and the smell of bread, and the fog lifted slowly. " * 60


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake lmdeploy, torch and transformers for tuichat's calibration entry, on the job's PYTHONPATH."""
    folder = fake_lite.make_site(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder


async def choose_calibration(pilot: Pilot[Any], screen: QuantizeScreen, value: str) -> None:
    screen.query_one("#qz-calib", Select).value = value
    await pilot.pause()


async def test_ptb_is_not_offered_and_an_offline_machine_is_told_the_offline_routes(model: Path) -> None:
    app, screen = form(model, probes=OFFLINE)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        values = [value for _, value in CALIB_CHOICES]
        assert "ptb" not in values and values[:2] == ["file", "history"] and values[-1] == "none"
        assert not screen.query_one("#qz-calib-file", Input).display  # only for local text
        await pilot.press("ctrl+s")  # wikitext2 by default: this machine has neither datasets nor a hub
        await wait_for(pilot, lambda: "'datasets' package" in message_text(screen))
        assert screen.state == "idle" and screen.job is None
        assert "--calib-file" in message_text(screen) and "--calib-samples 0" in message_text(screen)
        assert not (model.parent / "tiny-chat-awq-w4").exists()


async def test_local_text_from_the_form_calibrates_offline_and_shows_sizes_and_fit(
    model: Path, home: Path, site: Path
) -> None:
    corpus = home / "corpus.txt"
    corpus.write_text(TEXT)
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [500_000], "data_offsets": [0, 10**6]}}
    )
    with (model / "model.safetensors").open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header.encode() + bytes(10**6))
    app, screen = form(model, probes=OFFLINE)
    async with app.run_test(size=(110, 40)) as pilot:
        await opened(pilot, screen)
        await choose_calibration(pilot, screen, "file")
        field = screen.query_one("#qz-calib-file", Input)
        assert field.display and field.has_focus
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "Give the calibration text" in message_text(screen))
        field.value = "~/corpus.txt"
        screen.query_one("#qz-samples", Input).value = "4"
        screen.query_one("#qz-seqlen", Input).value = "512"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.state in ("done", "failed"), timeout=20)
        assert screen.state == "done", message_text(screen)
        text = message_text(screen)
        assert "Calibrated on local text" in text and "4 samples of 512 tokens" in text
        assert "Weights: 1.0 MB before, " in text
        assert "Fit of the original model on GPU 0" in text and "Fit of the quantized model on GPU 0" in text
        assert 'backend = "pytorch"' in text
        out = model.parent / "tiny-chat-awq-w4"
        assert json.loads((out / "inputs_stats.pth").read_text())["first"] in TEXT
        assert load_config().profiles["tiny-chat-awq-w4"].model_format == "awq"


async def test_history_with_too_little_text_is_refused_in_a_sentence(model: Path) -> None:
    with Store.open() as store:
        conv = store.create_conversation()
        store.add_message(conv, "user", "hello")
        store.add_message(conv, "assistant", "hi there")
    app, screen = form(model, probes=OFFLINE)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await choose_calibration(pilot, screen, "history")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "Your saved conversations has" in message_text(screen))
        assert "but 128 were asked" in message_text(screen)
        assert screen.job is None and screen.state == "idle"


async def test_data_free_from_the_form_says_it_costs_quality(model: Path) -> None:
    app, screen = form(model, probes=OFFLINE)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, screen)
        await choose_calibration(pilot, screen, "none")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.state in ("done", "failed"), timeout=20)
        assert screen.state == "done", message_text(screen)
        assert "Quantized data-free (no calibration)" in message_text(screen)
        assert not any("Loading calibrate dataset" in line for line in screen.lines)
