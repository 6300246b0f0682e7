"""The models screen's care for quantize jobs a dead tuichat left: looked for on opening, offered for clean-up.

A job still running (its process group alive) or its staging folder is found by `models.quantize.find_orphan_jobs`
in a thread; the first one is offered in a yes/no dialog, and cleaning up (stop the group, remove the partial
output) runs in a thread too. Looking is a courtesy: nothing here may get in the way of picking a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from textual import work
from textual.screen import Screen

from tuichat.models.quantize import OrphanJob, find_orphan_jobs
from tuichat.ui.screens.dialogs import ConfirmScreen

ResultT = TypeVar("ResultT")


class OrphanJobs(Screen[ResultT], Generic[ResultT]):
    """Offers to clean up a quantize job that a dead tuichat left (see the module docstring)."""

    orphans: list[OrphanJob] | None = None  # jobs a dead tuichat left, once looked for

    def say(self, level: str = "", sentence: str = "") -> None:
        raise NotImplementedError  # the screen's: one sentence under its inputs

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` on the event loop from a worker thread; dropped once the app has gone."""
        with contextlib.suppress(RuntimeError):
            self.app.call_from_thread(callback, *args)

    @work(thread=True, group="models-orphans", exit_on_error=False)
    def _look_for_orphans(self) -> None:
        try:
            found = find_orphan_jobs()
        except Exception:  # looking is a courtesy: never in the way of picking a model
            found = []
        self._post(self._orphans_found, found)

    def _orphans_found(self, found: list[OrphanJob]) -> None:
        self.orphans = found
        if found and self.is_attached:
            self._offer_clean_up(found[0])

    def _offer_clean_up(self, orphan: OrphanJob) -> None:
        def answer(yes: bool | None) -> None:
            if yes:
                self.say("info", "Cleaning up the old quantize job…")
                self._clean_up_orphan(orphan)
            else:
                self.say("info", "The old quantize job is left as it is; it is offered again next time.")

        question = f"{orphan.describe()} Stop it (if it runs) and remove its partial output?"
        self.app.push_screen(ConfirmScreen(question), answer)

    @work(thread=True, group="models-orphans", exit_on_error=False)
    def _clean_up_orphan(self, orphan: OrphanJob) -> None:
        try:
            sentence = orphan.clean_up()
        except Exception as exc:  # a sentence, never a traceback
            sentence = f"Cleaning up failed: {exc}."
        self._post(self._cleaned_up, sentence)

    def _cleaned_up(self, sentence: str) -> None:
        if self.is_attached:
            self.say("ok" if sentence.startswith("Cleaned up") else "error", sentence)
