"""Pilot tests for the image picker: the filtered folder tree, typed paths, errors, Esc, and the 80x24 fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from apphelpers import screen_text, wait_for
from textual.app import App
from textual.widgets import Input

from tuichat.ui.screens.image_picker import ImagePickerScreen, ImageTree


class Host(App[None]):
    """Pushes the picker at start and records what it dismissed with."""

    def __init__(self, start: Path | None) -> None:
        super().__init__()
        self.start = start
        self.results: list[Any] = []

    def on_mount(self) -> None:
        self.push_screen(ImagePickerScreen(self.start), self.results.append)


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    (folder / "holiday").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    for name in ("cat.png", "dog.JPG", "scan.bmp", "notes.txt", "model.safetensors", ".secret.png"):
        (folder / name).write_bytes(b"\x89PNG fake")
    (folder / "holiday" / "beach.webp").write_bytes(b"RIFF fake")
    return folder


def tree_labels(app: App[Any]) -> list[str]:
    tree = app.screen.query_one(ImageTree)
    return [str(node.label) for node in tree.root.children]


async def loaded(pilot: Any) -> ImagePickerScreen:
    app = pilot.app
    await wait_for(pilot, lambda: isinstance(app.screen, ImagePickerScreen))
    screen = app.screen
    assert isinstance(screen, ImagePickerScreen)
    await wait_for(pilot, lambda: bool(tree_labels(app)) and screen.query_one(ImageTree).cursor_line == 0)
    return screen


async def test_tree_lists_folders_and_images_only(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        assert tree_labels(app) == ["holiday", "cat.png", "dog.JPG", "scan.bmp"]
        text = screen_text(app)
        for absent in ("notes.txt", "model.safetensors", ".secret.png", ".thumbnails"):
            assert absent not in text


async def test_enter_on_a_file_in_the_tree_returns_it(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "enter")  # the cursor starts on the first entry, the holiday folder
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [pictures / "cat.png"]


async def test_enter_on_a_folder_opens_it_and_a_file_inside_can_be_chosen(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "beach.webp" in screen_text(app))
        assert app.results == []
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [pictures / "holiday" / "beach.webp"]


async def test_a_typed_path_with_tilde_is_accepted(
    pictures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    app = Host(pictures / "holiday")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("~", "/")  # typing while the tree has focus goes to the path field
        field = screen.query_one("#picker-path", Input)
        assert field.has_focus and field.value == "~/"
        field.insert_text_at_cursor("pictures/scan.bmp")
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [pictures / "scan.bmp"]


async def test_a_relative_path_is_read_from_the_folder_on_show(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        screen.query_one("#picker-path", Input).value = "holiday/beach.webp"
        screen.query_one("#picker-path", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [pictures / "holiday" / "beach.webp"]


async def test_wrong_typed_paths_explain_and_keep_the_picker_open(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        field = screen.query_one("#picker-path", Input)
        field.focus()
        field.value = "missing.png"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "No file at" in screen_text(app) and "check the path" in screen_text(app))
        field.value = "notes.txt"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "notes.txt is not a PNG, JPEG, WebP, GIF or BMP image" in screen_text(app))
        field.value = "~nosuchuser_tuichat/x.png"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cannot use ~nosuchuser_tuichat/x.png" in screen_text(app))
        assert app.results == [] and isinstance(app.screen, ImagePickerScreen)


async def test_a_typed_folder_and_backspace_move_the_tree(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        field = screen.query_one("#picker-path", Input)
        field.focus()
        field.value = "holiday"
        await pilot.press("enter")
        await wait_for(pilot, lambda: tree_labels(app) == ["beach.webp"])
        assert "pictures/holiday" in screen_text(app) and field.value == ""
        screen.query_one(ImageTree).focus()
        await pilot.press("backspace")
        await wait_for(pilot, lambda: tree_labels(app) == ["holiday", "cat.png", "dog.JPG", "scan.bmp"])


async def test_escape_returns_none(pictures: Path) -> None:
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("escape")
        await wait_for(pilot, lambda: bool(app.results))
        assert app.results == [None]
    # Esc also cancels from the path field
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await loaded(pilot)
        screen.query_one("#picker-path", Input).focus()
        await pilot.press("a", "escape")
        await wait_for(pilot, lambda: bool(app.results))
    assert app.results == [None]


async def test_starts_in_the_working_folder_by_default(pictures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pictures / "holiday")
    app = Host(None)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        assert tree_labels(app) == ["beach.webp"]


async def test_fits_80x24_with_the_hint_and_path_field(pictures: Path) -> None:
    for i in range(40):
        (pictures / f"photo-{i:02d}.jpeg").write_bytes(b"x")
    app = Host(pictures)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        lines = screen_text(app).splitlines()
        assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
        text = "\n".join(lines)
        assert "Enter attaches · Esc cancels · type a path below" in text
        assert "Folder:" in text and "type a path" in text
        assert "cat.png" in text
