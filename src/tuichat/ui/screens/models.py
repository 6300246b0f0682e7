"""The model picker: local models with their facts and fit, a profile from any of them, a hub id, or quantizing.

Models come from `tuichat.models.discovery.discover` (the configured model roots, the Hugging Face cache and the
ModelScope cache), run in a thread worker because it walks caches and reads safetensors headers. Broken folders are
listed below the table as the sentences discovery gives, so one bad download never hides the rest.

For the highlighted model the detail area shows the fit estimate (`models.fit.fit_sentence`) for the KV-cache share
of the profile that choosing it would create, against the free memory of the emptiest GPU (read once, in a
thread). Without a GPU it says so, and profiles can still be made. Making a profile uses `models.profile_for`
(model_format "awq" for AWQ folders, a longer session for vision models), shows `models.profile_notes`, asks
for the name and saves with `config.save_profile`; the screen then dismisses with a `ModelsResult`.
`q` opens the quantize form (`QuantizeScreen`) for the highlighted model. On opening, a quantize job that a
tuichat left behind when it died (still running, or its staging folder) is offered for clean-up (`models_orphans`).

`g` opens "get a model…" (`tuichat.ui.screens.pull.PullScreen`); a model it brings back is named here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Input, Label, Static

from tuichat.config import Config, load_config, save_profile
from tuichat.errors import TuichatError
from tuichat.models import pull as pulling
from tuichat.models.discovery import (
    DiscoveryResult,
    ModelInfo,
    discover,
    free_profile_name,
    hf_cache_dir,
    looks_like_hub_id,
    modelscope_cache_dir,
    profile_for,
    profile_notes,
)
from tuichat.models.fit import FitLine, fit_sentence
from tuichat.models.quantize import Probes
from tuichat.server.gpu import GpuReader, GpuSnapshot, NvmlReader, format_bytes
from tuichat.server.profiles import parse_profile, validate_name
from tuichat.ui.screens.models_orphans import OrphanJobs
from tuichat.ui.screens.quantize import QuantizeScreen, tilde, tilde_text
from tuichat.ui.widgets.key_footer import KeyFooter

_COLUMNS = ("name", "arch", "params", "dtype", "quant", "size", "vlm")
_LABELS = {
    "name": "Name",
    "arch": "Architecture",
    "params": "Params",
    "dtype": "Dtype",
    "quant": "Quant",
    "size": "Size",
    "vlm": "VLM",
}
_CAPS = {"params": 7, "dtype": 9, "quant": 15, "size": 9, "vlm": 3}  # widths of the columns sized to their content


@dataclass(frozen=True)
class ModelsResult:
    """What the model picker hands back: the profile it created (None: none)."""

    profile_name: str | None


def model_cells(model: ModelInfo) -> dict[str, str]:
    """One table row as plain strings."""
    return {
        "name": model.name,
        "arch": model.architecture,
        "params": model.params_text,
        "dtype": model.dtype or "?",
        "quant": model.quant_text,
        "size": format_bytes(model.size_bytes),
        "vlm": "yes" if model.is_vlm else "-",
    }


def column_widths(rows: list[dict[str, str]], available: int) -> dict[str, int]:
    """Small columns as wide as their content; name and architecture share the rest (the name gets more)."""
    widths: dict[str, int] = {}
    for key, cap in _CAPS.items():
        widths[key] = min(cap, max(len(_LABELS[key]), *(len(r[key]) for r in rows))) if rows else len(_LABELS[key])
    padding = 2 * len(_COLUMNS)  # DataTable pads each cell by one column on both sides
    rest = max(20, available - padding - sum(widths.values()))
    longest_arch = max([len(_LABELS["arch"]), *(len(r["arch"]) for r in rows)])
    longest_name = max([len(_LABELS["name"]), *(len(r["name"]) for r in rows)])
    if longest_name + longest_arch <= rest:
        widths["arch"] = longest_arch
    else:
        widths["arch"] = max(8, min(longest_arch, max(rest * 2 // 5, rest - longest_name)))
    widths["name"] = max(10, rest - widths["arch"])
    return widths


def _fit(value: str, width: int) -> Text:
    text = Text(value, no_wrap=True, overflow="ellipsis")
    text.truncate(width, overflow="ellipsis")
    return text


_FIT_STYLES = {"pending": "dim", "unknown": "yellow", "fits": "green", "too-big": "red"}


def fit_text(line: FitLine) -> Text:
    """The domain's fit line, green when it fits and red when it does not."""
    return Text(line.sentence, style=_FIT_STYLES[line.level])


def settings_text(table: Mapping[str, object]) -> str:
    """The settings a profile gets beyond its model, in a line."""
    rest = [f"{key} = {value}" for key, value in table.items() if key != "model"]
    return "Profile settings: " + (", ".join(rest) if rest else "lmdeploy's defaults")


class ModelsTable(DataTable[Text]):
    """The model list: one row per model folder."""


class ModelsScreen(OrphanJobs[ModelsResult | None]):
    """Pick a local model (or type a hub id) to make a profile for it, or quantize it. Dismisses with a result."""

    CSS_PATH = str(Path(__file__).with_name("models.tcss"))  # absolute: a subclass elsewhere finds it too

    BINDINGS: ClassVar[list[BindingType]] = [
        # Enter on the table or the hub-id field does the same (RowSelected, Submitted)
        Binding("p", "make_profile", "Profile", id="models_profile", key_display="⏎/p"),
        Binding("q", "quantize", "Quantize", id="models_quantize"),
        Binding("slash", "focus_hub", "Hub id", id="models_hub_id"),
        Binding("r", "rescan", "Rescan", id="models_rescan"),
        Binding("g", "get_model", "Get model", id="models_get"),
        Binding("escape", "back", "Back", id="models_back"),
    ]

    def __init__(
        self,
        config: Config,
        gpu_reader: GpuReader | None = None,
        *,
        quantize_command: list[str] | None = None,
        quantize_probes: Probes | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.quantize_command = quantize_command  # None: this Python's lmdeploy (tests give the stand-in)
        self.quantize_probes = quantize_probes  # None: the real machine's checks (tests: no hub, no GPU)
        self._reader = gpu_reader
        self._own_reader = gpu_reader is None
        self.scanning = False
        self.result: DiscoveryResult | None = None
        self.snapshot: GpuSnapshot | None = None
        self.naming: tuple[str, dict[str, object]] | None = None  # (what it is for, the profile table)
        self.message: tuple[str, str] | None = None  # (level, sentence)
        self._scan_gen = 0
        self._table_width = 0
        self._detail_hub = False  # the detail area speaks of the typed hub id, not the highlighted model
        self.free_probe: Callable[[Path], int] = pulling.disk_free  # tests give a small disk

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Label("Local models", id="mdl-title")
        yield Static("", id="mdl-status")
        yield ModelsTable(id="mdl-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="mdl-empty")
        yield Static("", id="mdl-problems")
        yield Static("", id="mdl-detail")
        with Horizontal(id="mdl-name-row", classes="mdl-row"):
            yield Label("profile name", classes="mdl-key")
            yield Input(
                placeholder="letters, digits, '.', '_' or '-' · Enter saves · Esc cancels", id="mdl-name", compact=True
            )
        with Horizontal(id="mdl-hub-row", classes="mdl-row"):
            yield Label("hub id", classes="mdl-key")
            yield Input(
                placeholder="owner/name (or a folder) · Enter makes a profile for it", id="mdl-hub", compact=True
            )
        yield Static("", id="mdl-message")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(ModelsTable).focus()
        self.rescan()
        self._read_gpu()
        self._look_for_orphans()

    def on_unmount(self) -> None:
        if self._own_reader and self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()

    def on_resize(self) -> None:
        # Column widths follow the table's width.
        self.call_after_refresh(self._refill_if_resized)

    def _refill_if_resized(self) -> None:
        if self.is_attached and self.query_one(ModelsTable).size.width != self._table_width:
            self._fill_table()

    @property
    def models(self) -> list[ModelInfo]:
        return self.result.models if self.result is not None else []

    def roots(self) -> list[Path]:
        return [Path(r).expanduser() for r in self.config.model_roots]

    # -- workers ----------------------------------------------------------------------------------------------

    def rescan(self) -> None:
        """Look for models again (in a thread); the table keeps its cursor on the same folder when it can."""
        self._scan_gen += 1
        self.scanning = True
        self._draw_status()
        self._scan(self._scan_gen, self.roots())

    @work(thread=True, group="models-scan", exit_on_error=False)
    def _scan(self, gen: int, roots: list[Path]) -> None:
        try:
            result = discover(roots)
        except Exception as exc:  # a sentence, never a traceback
            result = DiscoveryResult([], [f"Looking for models failed: {exc}. Press r to try again."])
        self._post(self._scanned, gen, result)

    def _scanned(self, gen: int, result: DiscoveryResult) -> None:
        if gen != self._scan_gen or not self.is_attached:
            return  # a newer scan is under way
        self.scanning = False
        self.result = result
        self._fill_table()
        self._draw_status()
        self._draw_problems()
        self._draw_detail()

    @work(thread=True, group="models-gpu", exit_on_error=False)
    def _read_gpu(self) -> None:
        if self._reader is None:
            self._reader = NvmlReader()
        try:
            snapshot = self._reader.read()
        except Exception as exc:  # a broken reader is "no GPU", not a crash
            snapshot = GpuSnapshot(time.monotonic(), (), f"GPU reading failed: {exc}")
        self._post(self._gpu_read, snapshot)

    def _gpu_read(self, snapshot: GpuSnapshot) -> None:
        self.snapshot = snapshot
        self._draw_detail()

    # -- drawing ----------------------------------------------------------------------------------------------

    def _draw_status(self) -> None:
        if not self.is_attached:
            return
        places = [*(tilde(r) for r in self.roots()), tilde(hf_cache_dir()), tilde(modelscope_cache_dir())]
        where = ", ".join(places)
        status = self.query_one("#mdl-status", Static)
        title = self.query_one("#mdl-title", Label)
        if self.scanning:
            status.update(Text(f"scanning… {where}"))
            title.update("Local models")
            return
        count = len(self.models)
        title.update(f"Local models · {count}")
        status.update(Text(f"searched {where}"))

    def _fill_table(self) -> None:
        table = self.query_one(ModelsTable)
        current = self.current_model()
        self._table_width = table.size.width
        rows = [model_cells(m) for m in self.models]
        available = (table.size.width or self.app.size.width) - 1  # leave the scrollbar its column
        widths = column_widths(rows, available)
        table.clear(columns=True)
        for key in _COLUMNS:
            table.add_column(_LABELS[key], width=widths[key], key=key)
        for index, cells in enumerate(rows):
            table.add_row(*(_fit(cells[key], widths[key]) for key in _COLUMNS), key=str(index))
        if current is not None:
            for index, model in enumerate(self.models):
                if model.path == current.path:
                    table.move_cursor(row=index, animate=False, scroll=True)
                    break
        empty = self.query_one("#mdl-empty", Static)
        nothing = not self.models and not self.scanning
        empty.display = nothing
        table.display = not nothing
        if nothing:
            empty.update(
                Text(
                    "No local models found. Add folders to [models] roots in config.toml, or download a model "
                    "into the Hugging Face or ModelScope cache; or type a hub id below (/) and press Enter."
                )
            )

    def _draw_problems(self) -> None:
        box = self.query_one("#mdl-problems", Static)
        problems = self.result.problems if self.result is not None else []
        box.display = bool(problems)
        box.update(Text("\n".join(f"⚠ {tilde_text(p)}" for p in problems)))

    def current_model(self) -> ModelInfo | None:
        """The model under the table's cursor."""
        table = self.query_one(ModelsTable)
        if not self.models or table.row_count == 0:
            return None
        row = min(table.cursor_row, table.row_count - 1)
        key = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        try:
            return self.models[int(key or "")]
        except (ValueError, IndexError):
            return None

    def _draw_detail(self) -> None:
        if not self.is_attached:
            return
        detail = self.query_one("#mdl-detail", Static)
        hub = self.query_one("#mdl-hub", Input).value.strip()
        if self._detail_hub and hub:
            detail.update(self._hub_detail(hub))
            return
        model = self.current_model()
        if model is None:
            detail.update(Text("scanning…" if self.scanning else "No model highlighted.", style="dim"))
            return
        detail.update(self._model_detail(model))

    def _model_detail(self, model: ModelInfo) -> Text:
        _, table = profile_for(model)
        where = Text(tilde(model.path), style="bold")
        if model.hub_id:
            where.append(f"  ({model.hub_id})", style="dim")
        lines: list[Text] = [
            where,
            fit_text(fit_sentence(model.weights_bytes, table, self.snapshot)),
            Text(settings_text(table), style="dim"),
        ]
        lines += [Text(note, style="yellow") for note in profile_notes(model)]
        return Text("\n").join(lines)

    @staticmethod
    def _hub_detail(text: str) -> Text:
        local = Path(text).expanduser()
        if local.is_dir():
            return Text(f"{tilde(local)}: a folder; Enter inspects it and makes a profile for it.", style="dim")
        if looks_like_hub_id(text):
            return Text(
                f"{text}: not on this machine; g gets it now (with progress, and its size and fit after), or Enter "
                "makes a profile for it and lmdeploy downloads it at the first start.",
                style="dim",
            )
        return Text(f"'{text}' is neither a folder nor a hub id such as internlm/internlm2-chat-1_8b.", style="yellow")

    def say(self, level: str = "", sentence: str = "") -> None:
        """One sentence under the inputs (level: error, ok or info); an empty one hides it."""
        self.message = (level, sentence) if sentence else None
        box = self.query_one("#mdl-message", Static)
        style = {"error": "red", "ok": "green", "warning": "yellow"}.get(level, "")
        box.update(Text(tilde_text(sentence), style=style))
        box.display = bool(sentence)

    @on(DataTable.RowHighlighted, "#mdl-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail_hub = False
        self._draw_detail()

    @on(DataTable.RowSelected, "#mdl-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_make_profile()

    @on(Input.Changed, "#mdl-hub")
    def _hub_changed(self, event: Input.Changed) -> None:
        self._detail_hub = bool(event.value.strip())
        self._draw_detail()

    # -- making a profile -------------------------------------------------------------------------------------

    def action_make_profile(self) -> None:
        if self.naming is not None:
            self._save_named()
            return
        hub = self.query_one("#mdl-hub", Input)
        if hub.has_focus and hub.value.strip():
            self._begin_naming(hub.value.strip())
            return
        model = self.current_model()
        if model is None:
            self.say("info", "There is no model to make a profile for: wait for the scan, or type a hub id (/).")
            return
        self._begin_naming(model)

    @on(Input.Submitted, "#mdl-hub")
    def _hub_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            self.say("info", "Type a hub id such as internlm/internlm2-chat-1_8b, then press Enter.")
            return
        self._begin_naming(text)

    def _begin_naming(self, target: ModelInfo | str) -> None:
        try:
            name, table = profile_for(target)
        except TuichatError as exc:
            self.say("error", str(exc))
            return
        what = target.name if isinstance(target, ModelInfo) else target
        self.naming = (what, table)
        self.refresh_bindings()
        name = free_profile_name(name, set(self.config.profiles))
        detail = self.query_one("#mdl-detail", Static)
        if isinstance(target, ModelInfo):
            detail.update(self._model_detail(target))
        else:
            lines = [Text(tilde(str(table["model"])), style="bold"), Text(settings_text(table), style="dim")]
            if not Path(target).expanduser().is_dir():
                lines.insert(1, self._hub_detail(target))
            detail.update(Text("\n").join(lines))
        self.query_one("#mdl-name-row").display = True
        field = self.query_one("#mdl-name", Input)
        field.value = name
        field.cursor_position = len(name)
        field.focus()
        self.say("info", f"A new profile for {what}: Enter saves it under this name, Esc cancels.")

    @on(Input.Submitted, "#mdl-name")
    def _name_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._save_named()

    def _save_named(self) -> None:
        if self.naming is None:
            return
        _, table = self.naming
        name = self.query_one("#mdl-name", Input).value.strip()
        try:
            validate_name(name)
        except TuichatError:
            self.say(
                "error",
                f"'{name}' cannot be a profile name: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit.",
            )
            return
        from tuichat.ui.screens.profile_editor import ask_before_overwriting

        # the one "replace that profile?" step every screen that saves a profile uses
        ask_before_overwriting(self, self.config, name, lambda: self._write(name, table))

    def _write(self, name: str, table: dict[str, object]) -> None:
        try:
            # checked as a Profile, then written by the one profile writer
            save_profile(name, parse_profile(name, table, self.config.path), path=self.config.path)
        except TuichatError as exc:
            self.say("error", f"Not saved: {exc}. Fix config.toml, then try again.")
            return
        except OSError as exc:
            self.say("error", f"Not saved: cannot write {self.config.path} ({exc.strerror}). Check its permissions.")
            return
        self.app.notify(f"Saved profile {name}.")
        self.dismiss(ModelsResult(name))

    def _end_naming(self) -> None:
        self.naming = None
        self.refresh_bindings()
        self.query_one("#mdl-name-row").display = False
        self.say()
        self.query_one(ModelsTable).focus()
        self._draw_detail()

    # -- other keys -------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("focus_hub", "quantize", "rescan", "get_model"):
            return self.naming is None  # while naming, the keys belong to the name field
        return True

    def action_focus_hub(self) -> None:
        if self.naming is not None:
            return
        self.query_one("#mdl-hub", Input).focus()

    def action_rescan(self) -> None:
        self.say()
        self.rescan()
        self._read_gpu()

    def action_get_model(self) -> None:
        typed = self.query_one("#mdl-hub", Input).value.strip()
        repo = typed if looks_like_hub_id(typed) else ""
        from tuichat.ui.screens.pull import PullScreen  # its module imports this one (fit_text)

        self.app.push_screen(PullScreen(self._reader, repo=repo, free_probe=self.free_probe), self._pulled)

    def _pulled(self, model: ModelInfo | None) -> None:
        self.rescan()  # whatever arrived is listed, even without a profile
        if model is not None and self.is_attached:
            self._begin_naming(model)

    def action_quantize(self) -> None:
        model = self.current_model()
        if model is None:
            self.say("info", "There is no model to quantize: wait for the scan, or add a model root.")
            return
        if model.quantization is not None:
            self.say("error", f"{model.name} is already quantized ({model.quant_text}): pick a full-precision model.")
            return
        self.app.push_screen(
            QuantizeScreen(
                self.config,
                str(model.path),
                command=self.quantize_command,
                probes=self.quantize_probes,
                gpu_reader=self._reader,
            ),
            self._quantized,
        )

    def _quantized(self, profile_name: str | None) -> None:
        if profile_name is not None:
            self.dismiss(ModelsResult(profile_name))
            return
        # a model may have been written without a profile: list it
        with contextlib.suppress(TuichatError):
            self.config = load_config(self.config.path)
        self.rescan()

    def action_back(self) -> None:
        if self.naming is not None:
            self._end_naming()
            return
        hub = self.query_one("#mdl-hub", Input)
        if hub.has_focus:
            hub.value = ""
            self._detail_hub = False
            self.query_one(ModelsTable).focus()
            self._draw_detail()
            return
        self.dismiss(None)
