"""The quantize screen's form: its fields, what they default to (an output folder and a free profile name that
follow the bit width until typed over), and reading them into `QuantizeOptions` with a sentence for each mistake.

`QuantizeScreen` (ui/screens/quantize.py) is this form plus the job it runs; the path helpers here show paths
under the home folder as `~/…`, as typed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Input, Label, Select

from tuichat.config import Config
from tuichat.errors import TuichatError
from tuichat.models.discovery import free_profile_name, hf_cache_dir, modelscope_cache_dir, profile_name_for
from tuichat.models.quantize import CALIB_DATASETS, DEFAULT_CALIB_DATASET, QuantizeOptions, validate_options
from tuichat.server.profiles import validate_name

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


class QuantizeForm(Screen[str | None]):
    """The form of the quantize screen; the screen supplies `_draw` (the form shows or hides the file field)."""

    config: Config
    model: str
    command: list[str]
    _auto_out: str  # the output folder as filled in, until the user types over it
    _auto_name: str  # the profile name as filled in, likewise

    def _draw(self) -> None:
        raise NotImplementedError  # QuantizeScreen's

    def compose_form(self) -> ComposeResult:
        """The title and the form (the screen adds the state, the log and the footer)."""
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

    def _free_name(self, out_name: str) -> str:
        return free_profile_name(profile_name_for(out_name), set(self.config.profiles))

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
