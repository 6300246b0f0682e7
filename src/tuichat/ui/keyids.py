"""Every binding id of every screen, so a `[keys]` entry naming no action can be reported instead of ignored."""

from __future__ import annotations

import importlib
from functools import cache

from textual.binding import Binding

# (module, class) of everything that declares bindings with ids
_HOLDERS = (
    ("tuichat.ui.app", "TuichatApp"),
    ("tuichat.ui.widgets", "PromptArea"),
    ("tuichat.ui.screens", "HelpScreen"),
    ("tuichat.ui.screens", "ConfirmScreen"),
    ("tuichat.ui.screens", "ChoiceScreen"),
    ("tuichat.ui.screens", "QuitScreen"),
    ("tuichat.ui.history_screen", "ConversationsScreen"),
    ("tuichat.ui.history_screen", "ConversationTable"),
    ("tuichat.ui.image_picker", "ImagePickerScreen"),
    ("tuichat.ui.server_screen", "ServerScreen"),
    ("tuichat.ui.profile_editor", "ProfileEditorScreen"),
    ("tuichat.ui.models_screen", "ModelsScreen"),
    ("tuichat.ui.quantize_screen", "QuantizeScreen"),
)


@cache
def known_binding_ids() -> frozenset[str]:
    ids: set[str] = set()
    for module_name, class_name in _HOLDERS:
        holder = getattr(importlib.import_module(module_name), class_name, None)
        for binding in getattr(holder, "BINDINGS", ()):
            if isinstance(binding, Binding) and binding.id:
                ids.add(binding.id)
    return frozenset(ids)
