"""Pick an image to attach: a folder tree showing only folders and image files, or a path typed by hand.

The tree starts in a given folder (the working directory by default); Backspace climbs to the parent folder.
Typing while the tree has focus goes into the path field, so `~/photos/cat.png` Enter works without first
moving focus. The screen only picks a path: reading, checking and shrinking the image is `tuichat.chat.images`'
job when the app attaches it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DirectoryTree, Input, Label, Static
from textual.widgets.directory_tree import DirEntry
from textual.widgets.tree import TreeNode

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
HINT = "Enter attaches · Esc cancels · type a path below · Backspace: parent folder"


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def display_path(path: Path) -> str:
    """The path with the home folder written as ~, as people type it."""
    try:
        return "~/" + str(path.relative_to(Path.home())) if path != Path.home() else "~"
    except (ValueError, RuntimeError):  # outside home, or no home at all
        return str(path)


class ImageTree(DirectoryTree):
    """A DirectoryTree listing folders and image files only, hidden entries left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            path for path in paths if not path.name.startswith(".") and (self._safe_is_dir(path) or is_image_name(path))
        ]

    def _populate_node(self, node: TreeNode[DirEntry], content: Iterable[Path]) -> None:
        super()._populate_node(node, content)
        if node is self.root:
            # With the root row hidden there is no cursor until an arrow key is pressed; put it on the first
            # entry so Enter works at once.
            self.call_after_refresh(self._cursor_to_first)

    def _cursor_to_first(self) -> None:
        if self.cursor_line < 0 and self.root.children:
            self.cursor_line = 0


class FolderLine(Widget):
    """The folder on show, cut from the left when narrow: the end of a path is the part that tells it apart."""

    DEFAULT_CSS = """
    FolderLine {
        height: 1;
        color: $text-muted;
    }
    """

    folder: reactive[Path] = reactive(Path("/"))

    def render(self) -> Text:
        suffix = "  (PNG, JPEG, WebP, GIF, BMP)"
        shown = display_path(self.folder)
        room = self.content_size.width - len("Folder: ") - len(suffix)
        if room > 0 and len(shown) > room:
            shown = "…" + shown[len(shown) - room + 1 :]
        return Text(f"Folder: {shown}{suffix}", no_wrap=True, overflow="ellipsis")


class ImagePickerScreen(ModalScreen[Path | None]):
    """Choose an image file; dismisses with its absolute Path, or None on Esc."""

    DEFAULT_CSS = """
    ImagePickerScreen {
        align: center middle;
    }
    ImagePickerScreen #picker-box {
        width: 100%;
        max-width: 100;
        height: 100%;
        max-height: 36;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    ImagePickerScreen #picker-title {
        text-style: bold;
        color: $accent;
    }
    ImagePickerScreen #picker-tree {
        height: 1fr;
        scrollbar-size-vertical: 1;
    }
    ImagePickerScreen #picker-hint {
        color: $text-muted;
    }
    ImagePickerScreen #picker-path {
        height: 3;
    }
    ImagePickerScreen #picker-error {
        color: $error;
        display: none;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="picker_cancel"),
        Binding("backspace", "parent", "Parent folder", id="picker_parent"),
    ]

    def __init__(self, start: Path | None = None) -> None:
        super().__init__()
        folder = (start or Path.cwd()).expanduser()
        self.folder = folder.resolve() if folder.is_dir() else Path.cwd().resolve()

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Label("Attach an image", id="picker-title")
            line = FolderLine(id="picker-folder")
            line.folder = self.folder
            yield line
            tree = ImageTree(self.folder, id="picker-tree")
            tree.show_root = False
            yield tree
            yield Static(HINT, id="picker-hint", markup=False)
            yield Input(
                placeholder="or type a path, e.g. ~/photos/cat.png, and press Enter",
                id="picker-path",
                select_on_focus=False,  # focus arrives with the first typed character, which must stay
            )
            yield Static("", id="picker-error", markup=False)

    def on_mount(self) -> None:
        self.query_one(ImageTree).focus()

    # -- choosing ---------------------------------------------------------------------------------------------

    @on(DirectoryTree.FileSelected, "#picker-tree")
    def _file_chosen(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(event.path.resolve())

    @on(Input.Submitted, "#picker-path")
    def _path_typed(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            self._error("Type a path, or pick a file in the list above.")
            return
        try:
            path = Path(text).expanduser()
            if not path.is_absolute():
                path = self.folder / path  # relative to the folder on show, which is what the user is looking at
            is_dir, is_file = path.is_dir(), path.is_file()
        except (OSError, RuntimeError, ValueError) as exc:  # no such ~user, no permission, a NUL in the text
            self._error(f"Cannot use {text}: {exc}. Check the path.")
            return
        if is_dir:
            self.go_to(path)
            event.input.value = ""
            return
        if not is_file:
            self._error(f"No file at {display_path(path)}: check the path (~ and relative paths work).")
            return
        if not is_image_name(path):
            self._error(f"{path.name} is not a PNG, JPEG, WebP, GIF or BMP image.")
            return
        self.dismiss(path.resolve())

    def _error(self, message: str) -> None:
        error = self.query_one("#picker-error", Static)
        error.update(message)
        error.display = True

    def go_to(self, folder: Path) -> None:
        """Show another folder in the tree."""
        self.folder = folder.resolve()
        self.query_one(ImageTree).path = self.folder
        self.query_one(FolderLine).folder = self.folder
        self.query_one("#picker-error", Static).display = False

    # -- keys -------------------------------------------------------------------------------------------------

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_parent(self) -> None:
        if self.folder.parent != self.folder:
            self.go_to(self.folder.parent)

    def on_key(self, event: events.Key) -> None:
        # Typing in the tree starts a path: the tree has no use for printable keys other than space.
        tree = self.query_one(ImageTree)
        if self.focused is tree and event.is_printable and event.character and event.character != " ":
            field = self.query_one("#picker-path", Input)
            field.focus()
            field.insert_text_at_cursor(event.character)
            event.stop()
            event.prevent_default()


__all__ = ["IMAGE_SUFFIXES", "ImagePickerScreen", "ImageTree", "display_path", "is_image_name"]
