"""Get a model from the hub: a hub id (with an optional revision and file patterns) pulled into the Hugging Face cache.

`tuichat.models.pull` runs in a thread and reports through a `PullProgress` subclass; the screen draws per-file and
overall bars (bytes, speed, time left). Esc stops it, keeping the part fetched so far for the next pull to resume.
When it is done it shows the model's facts and fit, and `p` hands the model back to the models screen, which asks
for a profile name.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Input, Label, Static

from tuichat.durations import format_duration
from tuichat.errors import TuichatError
from tuichat.models import pull as pulling
from tuichat.models.discovery import ModelInfo, inspect_model, looks_like_hub_id, profile_for, profile_notes
from tuichat.models.fit import fit_sentence, model_facts
from tuichat.server.gpu import GpuReader, GpuSnapshot, NvmlReader, format_bytes
from tuichat.ui.screens.models import fit_text
from tuichat.ui.screens.quantize import tilde_text
from tuichat.ui.widgets.key_footer import KeyFooter


def text_bar(done: int, total: int | None, width: int) -> str:
    """A bar of `width` cells, as full as done/total (empty while the total is unknown)."""
    width = max(1, width)
    if not total:
        return "░" * width
    full = min(width, done * width // total)
    return "█" * full + "░" * (width - full)


class PullReporter(pulling.PullProgress):
    """Hands a pull's progress, from its thread, to the screen's event loop."""

    interval_s = 0.1

    def __init__(self, post: Callable[..., None], screen: PullScreen) -> None:
        super().__init__()
        self._post_call = post
        self._screen = screen

    def show(self, view: pulling.ProgressView) -> None:
        self._post_call(self._screen.show_progress, view)

    def file_finished(self, line: str) -> None:
        self._post_call(self._screen.add_line, line, "")

    def note(self, text: str) -> None:
        self._post_call(self._screen.add_line, text, "dim")


@dataclass(frozen=True)
class PullDone:
    """What a finished pull found: the model's facts (None when its folder holds no model) and the GPU reading."""

    info: ModelInfo | None
    snapshot: GpuSnapshot | None
    summary: str
    problem: str | None = None


class PullScreen(Screen[ModelInfo | None]):
    """Get a model from the hub: type its id, watch it arrive, see its facts and fit, make a profile (p)."""

    CSS_PATH = str(Path(__file__).with_name("pull.tcss"))  # absolute: a subclass elsewhere finds it too

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "start", "Get", key_display="⏎", id="pull_start"),
        Binding("p", "profile", "Profile", id="pull_profile"),
        Binding("escape", "stop_or_back", "Stop/Back", id="pull_stop_or_back"),
    ]

    LOG_LINES = 40

    def __init__(
        self,
        gpu_reader: GpuReader | None = None,
        *,
        repo: str = "",
        free_probe: Callable[[Path], int] = pulling.disk_free,
    ) -> None:
        super().__init__()
        self._reader = gpu_reader
        self._repo = repo
        self.free_probe = free_probe
        self.state: str = "form"  # form, running, stopping, done, stopped, failed
        self.progress: PullReporter | None = None
        self.view: pulling.ProgressView | None = None
        self.lines: list[tuple[str, str]] = []
        self.done: PullDone | None = None
        self.message: tuple[str, str] | None = None

    def compose(self) -> ComposeResult:
        yield Label("Get a model from the Hugging Face hub", id="pull-title")
        with Horizontal(classes="pull-row"):
            yield Label("hub id", classes="pull-key")
            yield Input(self._repo, placeholder="owner/name, e.g. internlm/internlm2-chat-1_8b", id="pull-repo")
        with Horizontal(classes="pull-row"):
            yield Label("revision", classes="pull-key")
            yield Input(placeholder="main (or a branch, tag or commit)", id="pull-revision", compact=True)
        with Horizontal(classes="pull-row"):
            yield Label("files", classes="pull-key")
            yield Input(placeholder="all (or patterns such as *.json *.safetensors)", id="pull-include", compact=True)
        yield Static("", id="pull-file")
        yield Static("", id="pull-all")
        yield Static("", id="pull-log")
        yield Static("", id="pull-message")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        for field in self.query(Input).results():
            field.compact = True
        self.query_one("#pull-repo", Input).focus()
        self.say("info", "Type a hub id and press Enter: it goes into the Hugging Face cache, where lmdeploy finds it.")
        self._draw_progress()

    # -- state --------------------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "start":
            return self.state in ("form", "stopped", "failed")
        if action == "profile":
            return self.state == "done" and self.done is not None and self.done.info is not None
        return True

    def _set_state(self, state: str) -> None:
        self.state = state
        busy = state in ("running", "stopping", "done")
        for field in self.query(Input).results():
            field.disabled = busy
        if not busy:
            self.query_one("#pull-repo", Input).focus()
        self.refresh_bindings()

    def say(self, level: str = "", sentence: str = "") -> None:
        self.message = (level, sentence) if sentence else None
        style = {"error": "red", "ok": "green", "warning": "yellow"}.get(level, "")
        self.query_one("#pull-message", Static).update(Text(tilde_text(sentence), style=style))

    # -- starting and stopping ----------------------------------------------------------------------------------

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_start()

    def action_start(self) -> None:
        if self.state not in ("form", "stopped", "failed"):
            return
        repo = self.query_one("#pull-repo", Input).value.strip()
        if not looks_like_hub_id(repo):
            self.say(
                "error", "Give a hub id as owner/name, for example internlm/internlm2-chat-1_8b, then press Enter."
            )
            return
        revision = self.query_one("#pull-revision", Input).value.strip() or None
        include = self.query_one("#pull-include", Input).value.split()
        self.view = None
        self.lines = []
        self.done = None
        self.progress = PullReporter(self._post, self)
        self._set_state("running")
        self.say("info", f"Getting {repo}… Esc stops (what has arrived is kept, and the next pull resumes it).")
        self._draw_progress()
        self._pull(repo, revision, include, self.progress)

    def action_stop_or_back(self) -> None:
        if self.state == "running" and self.progress is not None:
            self.progress.cancel()
            self._set_state("stopping")
            self.say("warning", "Stopping after the current chunk…")
            return
        if self.state == "stopping":
            return
        self.dismiss(None)

    def action_profile(self) -> None:
        if self.state == "done" and self.done is not None and self.done.info is not None:
            self.dismiss(self.done.info)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self.app.call_from_thread(callback, *args)

    @work(thread=True, group="models-pull", exit_on_error=False)
    def _pull(self, repo: str, revision: str | None, include: list[str], progress: PullReporter) -> None:
        try:
            plan = pulling.make_plan(repo, revision=revision, include=include)
            result = pulling.pull(plan, progress, free_probe=self.free_probe)
        except pulling.Interrupted as exc:
            self._post(self._finished, "stopped", str(exc), None)
            return
        except TuichatError as exc:
            self._post(self._finished, "failed", str(exc), None)
            return
        except Exception as exc:  # a sentence, never a traceback
            self._post(self._finished, "failed", f"The pull failed: {exc}. Press Enter to try again.", None)
            return
        got = (
            f"{format_bytes(result.downloaded_bytes)} in {format_duration(result.elapsed_s)}"
            if result.downloaded_files
            else "nothing new to download"
        )
        summary = f"{plan.repo_id} is here ({got}), every file checked against the hub's hashes: {result.path}"
        info: ModelInfo | None = None
        problem = None
        try:
            info = inspect_model(result.path, hub_id=plan.repo_id)
        except TuichatError as exc:
            problem = (
                f"{exc} So there are no facts, fit or profile for it (did the file patterns leave out config.json?)"
            )
        snapshot = self._read_gpu()
        self._post(self._finished, "done", summary, PullDone(info, snapshot, summary, problem))

    def _read_gpu(self) -> GpuSnapshot | None:
        try:
            if self._reader is None:
                self._reader = NvmlReader()
            return self._reader.read()
        except Exception as exc:  # a broken reader is "no GPU", not a crash
            return GpuSnapshot(time.monotonic(), (), f"GPU reading failed: {exc}")

    def _finished(self, state: str, sentence: str, done: PullDone | None) -> None:
        if not self.is_attached:
            return
        self.done = done
        if state == "done" and self.progress is not None and self.progress.count:
            self.view = self.progress.view()  # the last numbers, not the last throttled ones
        self._set_state(state)
        if state == "done":
            self.say("ok", sentence)
            if self.screen.focused is not None:
                self.set_focus(None)  # p and Esc belong to the screen now, not to a text field
        elif state == "stopped":
            self.say("warning", sentence + " Press Enter to go on, or Esc to go back.")
        else:
            self.say("error", sentence)
        self._draw_progress()

    # -- drawing ------------------------------------------------------------------------------------------------

    def show_progress(self, view: pulling.ProgressView) -> None:
        if self.is_attached and self.state in ("running", "stopping"):
            self.view = view
            self._draw_progress()

    def add_line(self, text: str, style: str) -> None:
        if not self.is_attached:
            return
        self.lines = [*self.lines, (text, style)][-self.LOG_LINES :]
        self._draw_progress()

    def _draw_progress(self) -> None:
        width = max(10, self.size.width - 2)
        view = self.view
        file_box = self.query_one("#pull-file", Static)
        all_box = self.query_one("#pull-all", Static)
        if view is None:
            file_box.update(Text("file  " + text_bar(0, None, width - 6), style="dim"))
            all_box.update(Text("all   " + text_bar(0, None, width - 6), style="dim"))
        else:
            file_box.update(
                Text(view.file_text()).append("\n" + text_bar(view.file_have, view.file_size, width), style="cyan")
            )
            all_box.update(
                Text(view.overall_text()).append("\n" + text_bar(view.done, view.total, width), style="green")
            )
        log = Text("\n").join(Text(tilde_text(line), style=style) for line, style in self.lines)
        if self.done is not None:
            log = (
                Text("\n").join([log, *self._facts(self.done)])
                if self.lines
                else Text("\n").join(self._facts(self.done))
            )
        self.query_one("#pull-log", Static).update(log)

    @staticmethod
    def _facts(done: PullDone) -> list[Text]:
        if done.info is None:
            return [Text(done.problem or "No model in this folder.", style="yellow")]
        info = done.info
        lines = [Text(line, style="bold" if i == 0 else "") for i, line in enumerate(model_facts(info, None)[:2])]
        _, table = profile_for(info)
        lines.append(fit_text(fit_sentence(info.weights_bytes, table, done.snapshot)))
        lines += [Text(note, style="yellow") for note in profile_notes(info)]
        lines.append(Text("p makes a launch profile for it · Esc goes back to the list", style="dim"))
        return lines
