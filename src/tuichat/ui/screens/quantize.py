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
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, ProgressBar, Select, Static

from tuichat import paths
from tuichat.chat.sanitize import clean
from tuichat.config import Config, save_profile
from tuichat.errors import TuichatError
from tuichat.models.discovery import free_profile_name, hf_cache_dir, modelscope_cache_dir, profile_name_for
from tuichat.models.quantize import (
    CALIB_DATASETS,
    DEFAULT_CALIB_DATASET,
    JobStatus,
    Probes,
    QuantizeJob,
    QuantizeOptions,
    default_command,
    format_elapsed,
    validate_options,
)
from tuichat.server.gpu import GpuReader, GpuSnapshot, NvmlReader
from tuichat.server.logfollow import collapse_cr
from tuichat.server.procgroup import StopResult
from tuichat.server.profiles import validate_name
from tuichat.ui.screens.dialogs import ConfirmScreen
from tuichat.ui.screens.profile_editor import ask_before_overwriting
from tuichat.ui.widgets.log_view import LogView

TICK = 0.5  # seconds between polls of the job
LOG_KEEP = 500  # log lines kept on view; the whole log stays in its file
CANCEL_TIMEOUT = 10.0  # seconds before a cancel escalates to SIGKILL
MARKS: dict[str, tuple[str, str]] = {
    "idle": ("", ""),
    "starting": ("…", "yellow"),
    "running": ("◐", "yellow"),
    "cancelling": ("◌", "yellow"),
    "done": ("✔", "green"),
    "failed": ("✖", "red"),
    "cancelled": ("■", "yellow"),
}
_LAYER_PHASES = ("calibrating", "smoothing", "quantizing")
# best first: the offline sources, the downloaded sets, then none at all
CALIB_CHOICES: list[tuple[str, str]] = [
    ("local text (file or folder)", "file"),
    ("my saved conversations", "history"),
    *((f"{name} (download)", name) for name in CALIB_DATASETS),
    ("none: data-free, lower quality", "none"),
]


# ---------------------------------------------------------------- paths


def tilde(path: Path | str) -> str:
    """`path` with the home folder shown as `~`."""
    text = str(path)
    home = os.path.expanduser("~")
    if home not in ("", "/", "~") and (text == home or text.startswith(home.rstrip("/") + "/")):
        return "~" + text[len(home.rstrip("/")) :]
    return text


def tilde_text(text: str) -> str:
    """Every mention of the home folder in a sentence shown as `~` (error messages name whole paths)."""
    home = os.path.expanduser("~").rstrip("/")
    if home in ("", "~"):
        return text
    return text.replace(home + "/", "~/")


def _in_hub_cache(folder: Path) -> bool:
    """True for a folder inside the Hugging Face or ModelScope cache, where an output does not belong."""
    real = folder.absolute()
    if any(part.startswith("models--") for part in real.parts) and "snapshots" in real.parts:
        return True
    for cache in (hf_cache_dir(), modelscope_cache_dir()):
        with contextlib.suppress(ValueError):
            real.relative_to(cache.absolute())
            return True
    return False


def model_base_name(model: str) -> str:
    """The model's own name: a hub id's last part, a folder's name, the repo name of a hub-cache snapshot."""
    text = model.strip().rstrip("/")
    parts = Path(text).expanduser().parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index > 0 and parts[index - 1].startswith("models--"):
            return parts[index - 1].split("--")[-1]
    return text.rsplit("/", 1)[-1] or "model"


def default_output(model: str, roots: Sequence[str], w_bits: int = 4) -> Path:
    """`<model>-awq-w4` beside a local model folder, else under the first model root (else ~/models)."""
    target = f"{model_base_name(model)}-awq-w{w_bits}"
    local = Path(model.strip()).expanduser()
    if model.strip() and local.is_dir() and not _in_hub_cache(local):
        return local.absolute().parent / target
    if roots:
        return Path(roots[0]).expanduser().absolute() / target
    return Path.home() / "models" / target


def log_path_for(out: Path) -> Path:
    """One log per output folder name, kept in tuichat's state folder; each run appends to it."""
    return paths.state_dir() / "quantize" / f"{out.name}.log"


def tidy(line: str) -> str:
    """A log line as shown: the last state of a tqdm redraw, without control sequences."""
    return clean(collapse_cr(line)).rstrip()


class QuantizeScreen(Screen[str | None]):
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
        self.state = "idle"  # idle, starting, running, cancelling, done, failed, cancelled
        self.job: QuantizeJob | None = None
        self.status: JobStatus | None = None
        self.profile_saved: str | None = None
        self.messages: list[tuple[str, str]] = []  # (level, sentence)
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._abandoned = False  # the screen went away: a job that starts now must be cancelled at once
        self._wake = threading.Event()
        bits = 4
        self._auto_out = tilde(default_output(model, config.model_roots, bits))
        self._auto_name = self._free_name(Path(self._auto_out).name)

    # -- layout -----------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Label("Quantize to 4-bit AWQ (W4A16) with lmdeploy lite auto_awq", id="qz-title")
        with Vertical(id="qz-form"):
            with Horizontal(classes="qz-row"):
                yield Label("model", classes="qz-key")
                yield Input(
                    tilde(self.model), placeholder="model folder or hub id (owner/name)", id="qz-model", compact=True
                )
            with Horizontal(classes="qz-row"):
                yield Label("output folder", classes="qz-key")
                yield Input(
                    self._auto_out, placeholder="a new folder for the quantized model", id="qz-out", compact=True
                )
            with Horizontal(classes="qz-row"):
                yield Label("w-bits", classes="qz-key")
                yield Input("4", type="integer", id="qz-bits", classes="qz-num", compact=True)
                yield Label("group size", classes="qz-key2")
                yield Input("128", type="integer", id="qz-group", classes="qz-num", compact=True)
            with Horizontal(classes="qz-row"):
                yield Label("calibration", classes="qz-key")
                yield Select(
                    CALIB_CHOICES,
                    allow_blank=False,
                    value=DEFAULT_CALIB_DATASET,
                    id="qz-calib",
                    compact=True,
                )
                yield Input(
                    placeholder="a .txt, .md or .jsonl file, or a folder of them",
                    id="qz-calib-file",
                    compact=True,
                )
            with Horizontal(classes="qz-row"):
                yield Label("samples", classes="qz-key")
                yield Input("128", type="integer", id="qz-samples", classes="qz-num", compact=True)
                yield Label("seqlen", classes="qz-key2")
                yield Input("1024", type="integer", id="qz-seqlen", classes="qz-num", compact=True)
            with Horizontal(classes="qz-row"):
                yield Label("profile name", classes="qz-key")
                yield Input(self._auto_name, placeholder="blank = no profile", id="qz-profile", compact=True)
            with Horizontal(classes="qz-row"):
                yield Button("Start", id="qz-start", variant="primary", compact=True)
                yield Label("Ctrl+S starts · offline: local text, chats or data-free", id="qz-hint")
        with Vertical(id="qz-state-box"):
            yield Static("", id="qz-state")
            yield ProgressBar(total=1.0, show_eta=False, id="qz-progress")
            yield Static("", id="qz-message")
        yield LogView(keep=LOG_KEEP, id="qz-log")
        yield Footer(compact=True, show_command_palette=False)

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

    def _free_name(self, out_name: str) -> str:
        return free_profile_name(profile_name_for(out_name), set(self.config.profiles))

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
            elif state != "done":
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

    def say(self, *messages: tuple[str, str]) -> None:
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

    # -- the form ---------------------------------------------------------------------------------------------

    def _value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def _int(self, wid: str, label: str) -> int:
        text = self._value(wid)
        try:
            return int(text)
        except ValueError:
            raise TuichatError(f"{label} must be a whole number (got '{text}').") from None

    def read_form(self) -> tuple[QuantizeOptions, str | None]:
        """The job's options and the profile name (None: no profile); raises a TuichatError sentence."""
        model = self._value("qz-model")
        if not model:
            raise TuichatError("Give the model to quantize: a model folder, or a hub id such as owner/name.")
        out_text = self._value("qz-out")
        if not out_text:
            raise TuichatError("Give an output folder for the quantized model.")
        local = Path(model).expanduser()
        value = self.query_one("#qz-calib", Select).value
        calib = str(value) if isinstance(value, str) else DEFAULT_CALIB_DATASET
        calib_file: Path | None = None
        if calib == "file":
            typed = self._value("qz-calib-file")
            if not typed:
                raise TuichatError(
                    "Give the calibration text beside 'local text': a .txt, .md or .jsonl file, or a folder of them."
                )
            calib_file = Path(typed).expanduser().absolute()
        samples = 0 if calib == "none" else self._int("qz-samples", "samples")
        opts = QuantizeOptions(
            model=str(local.absolute()) if local.exists() else model,
            out=Path(out_text).expanduser().absolute(),
            w_bits=self._int("qz-bits", "w-bits"),
            group_size=self._int("qz-group", "group size"),
            calib_dataset=calib if calib in CALIB_DATASETS else DEFAULT_CALIB_DATASET,
            calib_samples=samples,
            calib_seqlen=self._int("qz-seqlen", "seqlen"),
            command=list(self.command),
            calib_file=calib_file,
            calib_history=calib == "history",
        )
        validate_options(opts)
        name = self._value("qz-profile") or None
        if name is not None:
            try:
                validate_name(name)
            except TuichatError:
                raise TuichatError(
                    f"'{name}' cannot be a profile name: use 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit (or leave it blank for no profile)."
                ) from None
        return opts, name

    @on(Input.Changed, "#qz-bits")
    def _bits_changed(self, event: Input.Changed) -> None:
        # an output name nobody has typed over follows the bit width (…-awq-w8)
        try:
            bits = int(event.value)
        except ValueError:
            return
        out = self.query_one("#qz-out", Input)
        if out.value != self._auto_out:
            return
        self._auto_out = tilde(default_output(self.model, self.config.model_roots, bits))
        out.value = self._auto_out
        profile = self.query_one("#qz-profile", Input)
        if profile.value == self._auto_name:
            self._auto_name = self._free_name(Path(self._auto_out).name)
            profile.value = self._auto_name

    @on(Select.Changed, "#qz-calib")
    def _calib_changed(self, event: Select.Changed) -> None:
        self._draw()
        if event.value == "file" and self.is_attached:
            self.query_one("#qz-calib-file", Input).focus()

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
        found: list[tuple[str, str]] = []
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
        level = "stop" if result.clean else "error"
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
