"""The quantize form: `lmdeploy lite auto_awq` (W4A16) as a managed job, with its progress, log, cancel and profile.

The work is `tuichat.models.quantize.QuantizeJob`: it runs lmdeploy in its own process group, writes into a hidden
staging folder and only renames a finished model into place, so a failed or cancelled run leaves nothing
behind. This screen only fills in `QuantizeOptions`, asks before an existing output folder is replaced, and
follows the job from a thread worker that polls it every half second and shows the new lines of its log
(the job reads the log once, for its progress and for this view: `QuantizeJob.new_lines`).
Cancelling stops the whole process group and shows how that went (`StopResult`), so the user can tell that no
lmdeploy process is left holding the GPU. A finished model gets a profile (`QuantizeJob.make_profile`, saved
with `config.save_profile`; a name that is taken is replaced only when the user agreed before the start); the
screen dismisses with that profile's name, or None.

Calibration comes from local text (a file or folder typed in the form), the user's saved conversations, a set
lmdeploy downloads, or nothing (data-free); `QuantizeJob.start` checks the choice (and the model, disk and GPU)
before anything runs, and a refusal comes back as the sentence under the form. A finished run shows the weights'
size before and after and the fit estimate of both.

Paths under the home folder are shown as `~/…` (and typed that way too): they are shorter, and read the same
on every machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Button, Input, ProgressBar, Select, Static

from tuichat import paths
from tuichat.chat.sanitize import clean
from tuichat.config import Config, save_profile
from tuichat.errors import TuichatError
from tuichat.models.quantize import (
    JobStatus,
    Probes,
    QuantizeJob,
    QuantizeOptions,
    default_command,
    format_elapsed,
)
from tuichat.server.gpu import GpuReader, GpuSnapshot, NvmlReader
from tuichat.server.logfollow import collapse_cr
from tuichat.server.procgroup import StopResult
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.profile_editor import ask_before_overwriting
from tuichat.ui.screens.quantize_form import CALIB_CHOICES as CALIB_CHOICES
from tuichat.ui.screens.quantize_form import QuantizeForm, default_output
from tuichat.ui.screens.quantize_form import model_base_name as model_base_name
from tuichat.ui.screens.quantize_form import tilde as tilde
from tuichat.ui.screens.quantize_form import tilde_text as tilde_text
from tuichat.ui.widgets.key_footer import KeyFooter
from tuichat.ui.widgets.log_view import LogView

TICK = 0.5  # seconds between polls of the job
LOG_KEEP = 500  # log lines kept on view; the whole log stays in its file
CANCEL_TIMEOUT = 10.0  # seconds before a cancel escalates to SIGKILL
# what the screen is doing: the job's own states, and its own steps around them
QuantizeState = Literal["idle", "starting", "running", "cancelling", "done", "failed", "cancelled"]
# of a sentence under the progress; "stop" is how a cancel's processes were stopped (kept past the job's end)
Level = Literal["error", "hint", "ok", "warning", "info", "stop"]
MARKS: dict[QuantizeState, tuple[str, str]] = {
    "idle": ("", ""),
    "starting": ("…", "yellow"),
    "running": ("◐", "yellow"),
    "cancelling": ("◌", "yellow"),
    "done": ("✔", "green"),
    "failed": ("✖", "red"),
    "cancelled": ("■", "yellow"),
}
_LAYER_PHASES = ("calibrating", "smoothing", "quantizing")


def log_path_for(out: Path) -> Path:
    """One log per output folder name, kept in tuichat's state folder; each run appends to it."""
    return paths.state_dir() / "quantize" / f"{out.name}.log"


def tidy(line: str) -> str:
    """A log line as shown: the last state of a tqdm redraw, without control sequences."""
    return clean(collapse_cr(line)).rstrip()


class QuantizeScreen(QuantizeForm):
    """A form for `lmdeploy lite auto_awq`; runs it, shows its progress and log, makes a profile for the result."""

    CSS_PATH = str(Path(__file__).with_name("quantize.tcss"))  # absolute: a subclass elsewhere finds it too

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start_job", "Start", id="quantize_start", priority=True),
        Binding("c", "cancel_job", "Cancel job", id="quantize_cancel"),
        Binding("enter", "finish", "Done", id="quantize_done", priority=True),
        Binding("escape", "back", "Back", id="quantize_back"),
    ]

    def __init__(
        self,
        config: Config,
        model: str,
        command: list[str] | None = None,
        *,
        probes: Probes | None = None,
        gpu_reader: GpuReader | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.command = list(command) if command else default_command()
        self.probes = probes  # None: the real machine (tests give fakes: no hub, no GPU)
        self.gpu_reader = gpu_reader  # for the fit estimate of the result; None: NVML, read once at the end
        self.clock: Callable[[], float] = time.monotonic  # elapsed time on screen; tests freeze it
        self.cancel_timeout = CANCEL_TIMEOUT
        self.state: QuantizeState = "idle"
        self.job: QuantizeJob | None = None
        self.status: JobStatus | None = None
        self.profile_saved: str | None = None
        self.messages: list[tuple[Level, str]] = []  # (level, sentence)
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._abandoned = False  # the screen went away: a job that starts now must be cancelled at once
        self._wake = threading.Event()
        bits = 4
        self._auto_out = tilde(default_output(model, config.model_roots, bits))
        self._auto_name = self._free_name(Path(self._auto_out).name)

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield from self.compose_form()
        with Vertical(id="qz-state-box"):
            yield Static("", id="qz-state")
            yield ProgressBar(total=1.0, show_eta=False, id="qz-progress")
            yield Static("", id="qz-message")
        yield LogView(keep=LOG_KEEP, id="qz-log")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        for field in self.query(Input).results():
            field.cursor_position = len(field.value)
        self.query_one("#qz-start", Button).focus()
        self._draw()

    def on_unmount(self) -> None:
        # The app is going away with the job still running: it must not outlive tuichat.
        self._abandoned = True
        job = self.job
        if job is not None and self.state in ("starting", "running", "cancelling"):
            with contextlib.suppress(Exception):
                job.cancel(timeout=min(self.cancel_timeout, 5.0))
        self._wake.set()

    # -- drawing ----------------------------------------------------------------------------------------------

    @property
    def log_view(self) -> LogView:
        return self.query_one("#qz-log", LogView)

    @property
    def lines(self) -> list[str]:
        """The log lines of this run on view (the last `LOG_KEEP`)."""
        return list(self.log_view.kept) if self.is_attached else []

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "cancelling")

    def elapsed(self) -> float:
        if self._started_at is None:
            return 0.0
        end = self._ended_at if self._ended_at is not None else self.clock()
        return max(0.0, end - self._started_at)

    def state_line(self) -> Text:
        """`◐ calibrating · layers 3 of 24 · 00:12`: the phase, the layers it has done, the time so far."""
        state = self.state
        mark, style = MARKS.get(state, ("", ""))
        status = self.status
        text = Text()
        if state == "idle":
            return text
        text.append(f"{mark} ", style=style)
        if state == "starting":
            text.append("starting", style=f"bold {style}")
            text.append(" · checking the model and the output folder")
            return text
        word = {"running": status.phase if status else "starting", "cancelling": "cancelling"}.get(state, state)
        text.append(word, style=f"bold {style}")
        if status is not None:
            if state == "running" and status.phase == "calibrating" and "calibration data" in status.message:
                text.append(f" · {status.message.split(': ', 1)[-1]}")
            elif status.phase in _LAYER_PHASES or state == "done":
                total = status.layers_total
                text.append(f" · layers {status.layers_done} of {total if total else '?'}")
            elif state == "running":
                text.append(f" · {status.message}")
            else:
                text.append(f" · while {status.phase}", style="dim")
        text.append(f" · {format_elapsed(self.elapsed())}")
        return text

    def _draw(self) -> None:
        if not self.is_attached:
            return
        self.log_view.keep_end()  # the log shrinks when messages appear
        self.query_one("#qz-state", Static).update(self.state_line())
        bar = self.query_one("#qz-progress", ProgressBar)
        status = self.status
        bar.display = self.state in ("running", "cancelling", "done") and status is not None
        if status is not None:
            fraction = status.fraction
            if fraction is None:
                bar.update(total=None)
            else:
                bar.update(total=1.0, progress=fraction)
        box = self.query_one("#qz-message", Static)
        styles = {"error": "red", "hint": "red", "ok": "green", "warning": "yellow", "info": ""}
        text = Text()
        for n, (level, sentence) in enumerate(self.messages):
            if n:
                text.append("\n")
            prefix = {"error": "✖ ", "hint": "→ ", "warning": "⚠ ", "ok": "✔ "}.get(level, "")
            text.append(prefix + sentence, style=styles.get(level, ""))
        box.update(text)
        box.display = bool(self.messages)
        locked = self.running or self.state == "done"
        for widget in (*self.query(Input).results(), self.query_one(Select), self.query_one("#qz-start", Button)):
            widget.disabled = locked
        calib_file = self.query_one("#qz-calib-file", Input)
        calib_file.display = self.query_one("#qz-calib", Select).value == "file"
        self.refresh_bindings()

    def say(self, *messages: tuple[Level, str]) -> None:
        """Show sentences under the progress (level: error, hint, ok, warning or info), replacing earlier ones."""
        self.messages = list(messages)
        self._draw()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "start_job":
            return self.state in ("idle", "failed", "cancelled")
        if action == "cancel_job":
            return self.state in ("starting", "running")
        if action == "finish":
            return self.state == "done"
        return True

    @on(Button.Pressed, "#qz-start")
    def _start_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_start_job()

    # -- starting ---------------------------------------------------------------------------------------------

    def action_start_job(self) -> None:
        if self.running or self.state == "done":
            return
        try:
            opts, name = self.read_form()
        except TuichatError as exc:
            self.say(("error", tilde_text(str(exc))))
            return
        if name is None:
            self._check_output(opts, name)
            return

        def declined() -> None:
            self.say(
                ("info", f"Not started: {name} is kept as it was. Choose another profile name, or leave it blank.")
            )
            self.query_one("#qz-profile", Input).focus()

        # asked now, not after the run: the answer must not wait for minutes of quantizing
        ask_before_overwriting(self, self.config, name, lambda: self._check_output(opts, name), declined=declined)

    def _check_output(self, opts: QuantizeOptions, name: str | None) -> None:
        """Start, once the user agreed to replace an output folder that holds something."""
        out = opts.out
        try:
            occupied = out.is_dir() and not out.is_symlink() and any(out.iterdir())
        except OSError:
            occupied = False  # start() says what is wrong with it
        if not occupied:
            self._launch(opts, name, overwrite=False)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._launch(opts, name, overwrite=True)
            else:
                self.say(("info", "Not started: choose another output folder, or start again and confirm replacing."))

        self.app.push_screen(
            ConfirmScreen(
                f"The output folder {tilde(out)} already exists and is not empty. Replace it with the quantized "
                "model? The old folder is removed only once the new model is complete."
            ),
            answer,
        )

    def _launch(self, opts: QuantizeOptions, name: str | None, *, overwrite: bool) -> None:
        self.state = "starting"
        self.job = None
        self.status = None
        self.profile_saved = None
        self._started_at = self.clock()
        self._ended_at = None
        self._wake.clear()
        log = self.log_view
        log.reset()
        log_path = log_path_for(opts.out)
        log.base_title = f"log · {tilde(log_path)}"
        log.focus()
        self.say()
        self._run_job(opts, log_path, overwrite, name)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` on the event loop from a worker thread; dropped once the app has gone."""
        with contextlib.suppress(RuntimeError):
            self.app.call_from_thread(callback, *args)

    @work(thread=True, group="quantize-job", exit_on_error=False)
    def _run_job(self, opts: QuantizeOptions, log_path: Path, overwrite: bool, name: str | None) -> None:
        try:
            job = QuantizeJob.start(opts, log_path, overwrite=overwrite, probes=self.probes)
        except TuichatError as exc:
            self._post(self._refused, str(exc))
            return
        except Exception as exc:  # a sentence, never a traceback
            self._post(self._refused, f"Cannot start the quantizer: {exc}.")
            return
        self.job = job  # set here, not only on the event loop, so that on_unmount can see it (see _abandoned)
        if self._abandoned:
            job.cancel(timeout=min(self.cancel_timeout, 5.0))
            return
        self._post(self._job_started, job)
        while True:
            status = job.poll()
            lines = [text for text in (tidy(line) for line in job.new_lines()) if text]
            if status.finished:
                saved, error = self._save_profile(job, status, name)
                summary = job.summary(self._gpu_snapshot()) if status.state == "done" else []
                self._post(self._job_finished, job, status, lines, saved, error, summary)
                return
            self._post(self._job_progress, job, status, lines)
            self._wake.wait(TICK)
            self._wake.clear()

    def _gpu_snapshot(self) -> GpuSnapshot | None:
        """One GPU reading for the fit estimate (worker thread); None when there is no NVML."""
        reader = self.gpu_reader
        own = reader is None
        try:
            reader = reader or NvmlReader()
            return reader.read()
        except Exception:  # a fit estimate is a nicety; its absence is said in words
            return None
        finally:
            if own and reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()

    def _save_profile(self, job: QuantizeJob, status: JobStatus, name: str | None) -> tuple[str | None, str | None]:
        if status.state != "done" or name is None:
            return None, None
        try:
            profile_name, profile = job.make_profile(name)
            save_profile(profile_name, profile, path=self.config.path)
        except TuichatError as exc:
            return None, f"The model is ready, but its profile was not saved: {exc}"
        except OSError as exc:
            return None, f"The model is ready, but its profile was not saved: {exc.strerror or exc}."
        return profile_name, None

    def _refused(self, message: str) -> None:
        # nothing ran: back to the form, with the reason
        self.state = "idle"
        self._started_at = None
        self.log_view.base_title = "log"
        self.say(("error", tilde_text(message)))
        self.query_one("#qz-start", Button).focus()

    def _job_started(self, job: QuantizeJob) -> None:
        if self.state == "starting":
            self.state = "running"
        self.messages = [("info", f"Calibration: {job.options.calib_words}.")]
        self.messages += [("warning", tilde_text(note)) for note in job.notes]
        self._draw()

    def _show_lines(self, lines: list[str]) -> None:
        if self.is_attached:
            self.log_view.add(lines)

    def _job_progress(self, job: QuantizeJob, status: JobStatus, lines: list[str]) -> None:
        if job is not self.job:
            return
        if self.state != "cancelling":
            self.state = "running"
        self.status = status
        self._show_lines(lines)
        self._draw()

    def _job_finished(
        self,
        job: QuantizeJob,
        status: JobStatus,
        lines: list[str],
        saved: str | None,
        error: str | None,
        summary: Sequence[str] = (),
    ) -> None:
        if job is not self.job:
            return
        self.status = status
        self.state = status.state
        self._ended_at = self.clock()
        self._show_lines(lines)
        kept = [m for m in self.messages if m[0] == "stop"]  # the cancel's StopResult, when it came first
        found: list[tuple[Level, str]] = []
        if status.state == "done":
            self.profile_saved = saved
            found.append(("ok", tilde_text(status.message)))
            if saved is not None:
                found.append(("ok", f"Saved profile {saved}. Enter goes back with it selected."))
            elif error is not None:
                found.append(("error", tilde_text(error)))
            else:
                found.append(("info", "No profile name was given, so no profile was made. Enter goes back."))
            found += [("info", tilde_text(line)) for line in summary]
        elif status.state == "cancelled":
            found.append(("info", tilde_text(status.message) + "."))
            if status.hint:
                found.append(("hint", tilde_text(status.hint)))
        else:
            found.append(("error", tilde_text(status.message)))
            if status.hint:
                found.append(("hint", tilde_text(status.hint)))
            found.append(("info", "Fix the form and press Ctrl+S to try again; the log below has the details."))
        self.messages = [*found, *kept]
        self._draw()
        if self.state == "done":
            self.log_view.focus()

    # -- cancelling and leaving -------------------------------------------------------------------------------

    def action_cancel_job(self) -> None:
        if self.state not in ("starting", "running") or self.job is None:
            if self.state == "starting":
                self.say(("info", "Wait: the quantizer is starting; c cancels it once it runs."))
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._begin_cancel(leave=False)

        self.app.push_screen(
            ConfirmScreen("Cancel the quantization? Every lmdeploy process is stopped and the partial output removed."),
            answer,
        )

    def _begin_cancel(self, *, leave: bool) -> None:
        job = self.job
        if job is None or self.state not in ("starting", "running"):
            if leave:
                self.dismiss(None)
            return
        self.state = "cancelling"
        self._draw()
        self._cancel(job, leave)

    @work(thread=True, group="quantize-cancel", exit_on_error=False)
    def _cancel(self, job: QuantizeJob, leave: bool) -> None:
        try:
            result = job.cancel(timeout=self.cancel_timeout)
        except Exception as exc:  # a sentence, never a traceback
            self._post(self._cancel_failed, f"Cancelling failed: {exc}. Press c to try again.")
            return
        finally:
            self._wake.set()  # the poll loop collects the cancelled status at once
        self._post(self._cancelled, job, result, leave)

    def _cancel_failed(self, message: str) -> None:
        self.state = "running"
        self.say(("error", message))

    def _cancelled(self, job: QuantizeJob, result: StopResult, leave: bool) -> None:
        if job is not self.job:
            return
        level: Level = "stop" if result.clean else "error"
        sentence = result.describe("The quantizer")
        if result.clean and result.signal_used != "none":
            sentence += " No lmdeploy process is left."
        self.messages = [*(m for m in self.messages if m[0] != "stop"), (level, sentence)]
        self._draw()
        if leave:
            self.dismiss(None)

    def action_finish(self) -> None:
        if self.state == "done":
            self.dismiss(self.profile_saved)

    def action_back(self) -> None:
        if self.state in ("cancelling", "starting") or (self.state == "running" and self.job is None):
            self.say(
                ("info", f"Wait: the quantizer is {'being stopped' if self.state == 'cancelling' else 'starting'}.")
            )
            return
        if self.state == "running":

            def answer(yes: bool | None) -> None:
                if yes:
                    self._begin_cancel(leave=True)

            self.app.push_screen(
                ConfirmScreen("The quantization is still running. Cancel it and go back? (n keeps it running here)"),
                answer,
            )
            return
        self.dismiss(self.profile_saved if self.state == "done" else None)
