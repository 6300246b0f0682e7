"""SVG snapshots of the model picker and the quantize form at 80x24 and 120x40.

Nothing pictured depends on the machine: HOME is the test's tmp_path (paths show as `~/…`, the caches are the
default ones under it), model folders hold fixed files, the GPU is a FakeGpuReader, inputs have cursor blink
off, and the quantize form's clock is frozen so its elapsed time reads 00:00. Update the baselines with
`pytest --snapshot-update tests/test_snapshots_models.py` and look at the report before committing them.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apphelpers import settled, wait_for
from fakegpu import FakeGpuReader
from textual.app import App
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input

from tuichat.config import load_config
from tuichat.models.discovery import inspect_model
from tuichat.models.pull import ProgressView
from tuichat.models.quantize import Probes
from tuichat.server.gpu import GpuInfo, GpuSnapshot
from tuichat.ui.screens.models import ModelsScreen, ModelsTable
from tuichat.ui.screens.pull import PullDone, PullScreen
from tuichat.ui.screens.quantize import QuantizeScreen

SIZES = [(80, 24), (120, 40)]
GB = 1000**3
FAKE = Path(__file__).with_name("fake_lite.py")
QWEN = {
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
AWQ = {**QWEN, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}, "torch_dtype": "float16"}
VLM = {
    **QWEN,
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {"hidden_size": 128, "depth": 2},
}


class Host(App[None]):
    def __init__(self, make: Callable[[], Screen[Any]]) -> None:
        super().__init__()
        self.make = make

    def on_mount(self) -> None:
        self.push_screen(self.make())


def make_model(folder: Path, config: dict[str, Any], rows: int = 256) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    size = rows * 256 * 2
    header = json.dumps({"w.weight": {"dtype": "BF16", "shape": [rows, 256], "data_offsets": [0, size]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * size)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hermetic_home: Path) -> Path:
    """HOME is tmp_path, so TUICHAT_HOME and the default caches all show as ~/…; one model root, ~/models."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "MODELSCOPE_CACHE"):
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "models"
    make_model(root / "tiny-chat", QWEN, rows=1024)
    make_model(root / "tiny-awq", AWQ, rows=64)
    make_model(root / "Qwen2-VL-tiny-Instruct", VLM, rows=512)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"architectures": [')
    snapshot = (
        tmp_path / ".cache" / "huggingface" / "hub" / "models--internlm--internlm2-chat-1_8b" / "snapshots" / "r1"
    )
    make_model(snapshot, {**QWEN, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"}, rows=2048)
    hermetic_home.mkdir(parents=True, exist_ok=True)
    (hermetic_home / "config.toml").write_text(f'[models]\nroots = ["{root}"]\n')
    return tmp_path


def no_blink(pilot: Pilot[Any]) -> None:
    for field in pilot.app.screen.query(Input).results():
        field.cursor_blink = False


def models_app() -> Host:
    reader = FakeGpuReader([GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GB, mem_total=150 * GB)])
    return Host(lambda: ModelsScreen(load_config(), reader))


async def models_ready(pilot: Pilot[Any]) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ModelsScreen))
    screen = pilot.app.screen
    assert isinstance(screen, ModelsScreen)
    await wait_for(pilot, lambda: screen.result is not None and screen.snapshot is not None)
    no_blink(pilot)
    await settled(pilot)


async def naming_ready(pilot: Pilot[Any]) -> None:
    await models_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ModelsScreen)
    index = [m.name for m in screen.models].index("tiny-awq")
    screen.query_one(ModelsTable).move_cursor(row=index)
    await pilot.pause()
    await pilot.press("p")
    await wait_for(pilot, lambda: screen.query_one("#mdl-name", Input).has_focus)
    no_blink(pilot)
    await settled(pilot)


ONLINE = Probes(
    has_module=lambda python, name: True,
    hub_reachable=lambda: True,
    dataset_cached=lambda name: False,
    gpu_snapshot=lambda: None,
    disk_free=lambda path: 10**15,
)


def quantize_app(home: Path, model: str, *switches: str) -> Host:
    command = [sys.executable, str(FAKE), "--fake-seconds", "0.1", *switches]
    gpu = FakeGpuReader([GpuInfo(0, "NVIDIA H200", "GPU-0", mem_used=2 * GB, mem_total=140 * GB)])

    def make() -> QuantizeScreen:
        screen = QuantizeScreen(
            load_config(), str(home / "models" / model), command=command, probes=ONLINE, gpu_reader=gpu
        )
        screen.clock = lambda: 0.0  # elapsed time reads 00:00 however long the run took
        return screen

    return Host(make)


async def form_ready(pilot: Pilot[Any]) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, QuantizeScreen))
    no_blink(pilot)
    await settled(pilot)


async def quantized_ready(pilot: Pilot[Any]) -> None:
    await form_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, QuantizeScreen)
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: screen.state in ("done", "failed"), timeout=20)
    # the summary (sizes, fit) is drawn after the state turns: under load that can take several frames
    await settled(pilot)


async def refused_ready(pilot: Pilot[Any]) -> None:
    await form_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, QuantizeScreen)
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: any("already quantized" in m for _, m in screen.messages))
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_models_list(snap_compare: Any, home: Path, size: tuple[int, int]) -> None:
    assert snap_compare(models_app(), terminal_size=size, run_before=models_ready)


def test_models_naming_an_awq_profile(snap_compare: Any, home: Path) -> None:
    assert snap_compare(models_app(), terminal_size=(80, 24), run_before=naming_ready)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_quantize_form(snap_compare: Any, home: Path, size: tuple[int, int]) -> None:
    assert snap_compare(quantize_app(home, "tiny-chat"), terminal_size=size, run_before=form_ready)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_quantize_done(snap_compare: Any, home: Path, size: tuple[int, int]) -> None:
    assert snap_compare(quantize_app(home, "tiny-chat"), terminal_size=size, run_before=quantized_ready)


def test_quantize_failed_with_a_hint(snap_compare: Any, home: Path) -> None:
    app = quantize_app(home, "tiny-chat", "--fake-fail", "oom")
    assert snap_compare(app, terminal_size=(80, 24), run_before=quantized_ready)


def test_quantize_refused_for_a_quantized_model(snap_compare: Any, home: Path) -> None:
    assert snap_compare(quantize_app(home, "tiny-awq"), terminal_size=(80, 24), run_before=refused_ready)


# ---------------------------------------------------------------- get a model
# The pull is not run here (its speeds, times and the stand-in's port change each run): the screen is given a
# fixed moment of one, the way its worker hands them over.

PULL_GPU = GpuInfo(0, "Fake H200", "GPU-0", mem_used=10 * GB, mem_total=150 * GB)


def pull_app(home: Path, state: str) -> Host:
    def make() -> PullScreen:
        return PullScreen(FakeGpuReader([PULL_GPU]), repo="internlm/internlm2-chat-1_8b")

    app = Host(make)
    app.state = state  # type: ignore[attr-defined]
    return app


async def pull_ready(pilot: Pilot[Any]) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, PullScreen))
    screen = pilot.app.screen
    assert isinstance(screen, PullScreen)
    no_blink(pilot)
    state = pilot.app.state  # type: ignore[attr-defined]
    if state != "form":
        screen._set_state("running")
        screen.add_line("pulling internlm/internlm2-chat-1_8b (main = 0123456789ab): 12 files, 3.8 GB", "dim")
        screen.add_line("[1/12] tokenizer_config.json: 2.1 kB in 0 s, git hash ok", "")
        screen.show_progress(
            ProgressView(
                2,
                12,
                "model-00001-of-00002.safetensors",
                1_200_000_000,
                1_980_000_000,
                95e6,
                1_200_002_100,
                3_780_000_000,
                95e6,
            )
        )
    if state == "done":
        snap = Path.home() / "models" / "tiny-chat"
        info = inspect_model(snap, hub_id="internlm/internlm2-chat-1_8b")
        screen._finished(
            "done",
            f"internlm/internlm2-chat-1_8b is here (3.8 GB in 40 s), every file checked against the hub's hashes: "
            f"{snap}",
            PullDone(info, GpuSnapshot(0.0, (PULL_GPU,)), "", None),
        )
    await settled(pilot)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
@pytest.mark.parametrize("state", ["running", "done"])
def test_get_a_model(snap_compare: Any, home: Path, size: tuple[int, int], state: str) -> None:
    assert snap_compare(pull_app(home, state), terminal_size=size, run_before=pull_ready)
