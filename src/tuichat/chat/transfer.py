"""Conversations out of and into the history: Markdown and JSON exports, and imports of tuichat's JSON.

An export is cleaned of terminal control sequences on the way out (JSON escapes C0 controls, not C1 or bidi ones,
and `jq -r` would unescape the rest onto a terminal); an imported file is untrusted, so every text in it is cleaned
and every field checked, each failure a sentence naming the field. One side of a compare run carries the other side
in its JSON export, so an import restores the linked pair.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from tuichat.chat.sanitize import clean, clean_data, clean_line
from tuichat.chat.store import DEFAULT_TITLE, ROLES, STATES, Conversation, Message, Store, clean_label
from tuichat.errors import TuichatError

EXPORT_FORMAT_VERSION = 1
_PARTIAL_NOTES = {
    "streaming": "*(reply in progress)*",
    "stopped": "*(reply stopped)*",
    "interrupted": "*(reply interrupted)*",
    "error": "*(reply failed)*",
}


def export_conversation(store: Store, conv_id: int, fmt: Literal["md", "json"] = "md") -> str:
    """Conversation `conv_id` as Markdown to read, or as JSON that `import_conversation` takes back."""
    conv = store.get_conversation(conv_id)
    if conv is None:
        raise TuichatError(f"Conversation {conv_id} no longer exists; pick another one to export.")
    msgs = store.messages(conv_id)
    if fmt == "json":
        # one side of a compare run carries the other side along, so an import restores the pair
        partner = store.get_conversation(conv.partner_id) if conv.partner_id is not None else None
        return _export_json(conv, msgs, (partner, store.messages(partner.id)) if partner is not None else None)
    if fmt == "md":
        return _export_markdown(conv, msgs)
    raise ValueError(f"unknown export format {fmt!r}")


def import_conversation(store: Store, text: str) -> int:
    """Add a conversation from `export_conversation(..., "json")` output; returns its new id. An export of one
    side of a compare run brings the other side too, and the two are linked again."""
    conv, msgs = _parse_export(text)
    comparison = _parse_comparison(text)
    conv_id = store.insert_conversation(conv, msgs)
    if comparison is not None:
        side, side_label, other_label, other, other_msgs = comparison
        other_id = store.insert_conversation(other, other_msgs)
        if side == "A":
            store.link_pair(conv_id, other_id, (side_label, other_label))
        else:
            store.link_pair(other_id, conv_id, (other_label, side_label))
    return conv_id


def _export_json(
    conv: Conversation, msgs: list[Message], partner: tuple[Conversation, list[Message]] | None = None
) -> str:
    document: dict[str, Any] = {"tuichat_export": EXPORT_FORMAT_VERSION, **_export_body(conv, msgs)}
    if partner is not None:
        other, other_msgs = partner
        document["comparison"] = {
            "side": conv.compare_side,
            "label": clean_line(conv.compare_label or ""),
            "partner": {
                "side": other.compare_side,
                "label": clean_line(other.compare_label or ""),
                **_export_body(other, other_msgs),
            },
        }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def _export_body(conv: Conversation, msgs: list[Message]) -> dict[str, Any]:
    return {
        "conversation": {
            "title": clean_line(conv.title),
            "created": conv.created,
            "updated": conv.updated,
            "model": clean_label(conv.model),
            "server_url": clean_label(conv.server_url),
            "profile": clean_label(conv.profile),
            "lmdeploy_version": clean_label(conv.lmdeploy_version),
        },
        # Cleaned too: JSON escapes C0 controls but not C1 ones nor bidi controls, and `jq -r` would
        # unescape the rest onto a terminal.
        "messages": [
            {
                "role": m.role,
                "content": clean(m.content),
                "state": m.state,
                "created": m.created,
                "sampling": clean_data(m.sampling),
                "stats": clean_data(m.stats),
                "images": [clean_line(name) for name in m.images],
            }
            for m in msgs
        ],
    }


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


def _stats_line(stats: Mapping[str, Any]) -> str:
    parts = []
    ttft = stats.get("ttft")
    if isinstance(ttft, int | float):
        parts.append(f"first token {ttft:.2f} s")
    speed = stats.get("tokens_per_s")
    if isinstance(speed, int | float):
        parts.append(f"{speed:.1f} tokens/s")
    for key, label in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        value = stats.get(key)
        if isinstance(value, int):
            parts.append(f"{value} {label} tokens")
    return "_" + " · ".join(parts) + "_" if parts else ""


def _export_markdown(conv: Conversation, msgs: list[Message]) -> str:
    lines = [f"# {clean_line(conv.title)}", ""]
    for label, value in (
        ("Model", conv.model),
        ("Server", conv.server_url),
        ("Profile", conv.profile),
        ("LMDeploy", conv.lmdeploy_version),
    ):
        if value:
            lines.append(f"- {label}: {clean_line(value)}")
    if conv.partner_id is not None:
        lines.append(f"- Compared: side {conv.compare_side} of a pair with conversation {conv.partner_id}")
    lines += [f"- Date: {_when(conv.created)}", ""]
    for m in msgs:
        lines += [f"## {m.role.capitalize()}", ""]
        if m.images:
            lines += ["Images: " + ", ".join(clean_line(name) for name in m.images), ""]
        content = clean(m.content)
        if content:
            lines += [content.rstrip("\n"), ""]
        note = _PARTIAL_NOTES.get(m.state)
        if note and m.role == "assistant":
            lines += [note, ""]
        if m.stats:
            stats_line = _stats_line(m.stats)
            if stats_line:
                lines += [stats_line, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _bad_import(detail: str) -> TuichatError:
    return TuichatError(f"This is not a tuichat conversation export: {detail}.")


def _optional_text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return clean_line(value) or None  # an imported file is untrusted: no terminal sequences in it
    raise _bad_import(f"{where} must be text")


def _timestamp(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad_import(f"{where} must be a time in seconds")
    return float(value)


def _parse_export(text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TuichatError(
            f"The file is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "import a file written by tuichat's JSON export."
        ) from exc
    if not isinstance(document, dict) or "tuichat_export" not in document:
        raise _bad_import('the "tuichat_export" key is missing; import a file written by tuichat\'s JSON export')
    if document["tuichat_export"] != EXPORT_FORMAT_VERSION:
        raise TuichatError(
            f"This export has format version {document['tuichat_export']!r}, but this tuichat reads version "
            f"{EXPORT_FORMAT_VERSION}; upgrade tuichat to import it."
        )
    return _parse_body(document)


def _parse_comparison(text: str) -> tuple[str, str, str, dict[str, Any], list[dict[str, Any]]] | None:
    """The other side carried by an export of one side of a compare run: (this side, its label, the other's
    label, the other conversation, its messages); None when the export is of a plain conversation."""
    comparison = json.loads(text).get("comparison")
    if comparison is None:
        return None
    if not isinstance(comparison, dict) or not isinstance(comparison.get("partner"), dict):
        raise _bad_import('"comparison" must be an object with the other side under "partner"')
    side = comparison.get("side")
    if side not in ("A", "B"):
        raise _bad_import(f'"comparison.side" is {side!r}; it must be "A" or "B"')
    labels = [_optional_text(c.get("label"), "a comparison label") or "" for c in (comparison, comparison["partner"])]
    conv, msgs = _parse_body(comparison["partner"], where="comparison.partner.")
    return side, labels[0], labels[1], conv, msgs


def _parse_body(document: Mapping[str, Any], where: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    raw_conv = document.get("conversation")
    raw_msgs = document.get("messages")
    if not isinstance(raw_conv, dict):
        raise _bad_import(f'"{where}conversation" must be an object')
    if not isinstance(raw_msgs, list):
        raise _bad_import(f'"{where}messages" must be a list')
    now = time.time()
    title = _optional_text(raw_conv.get("title"), "the conversation title")
    conv: dict[str, Any] = {
        "title": title or DEFAULT_TITLE,
        "created": _timestamp(raw_conv.get("created"), "conversation.created", now),
    }
    conv["updated"] = _timestamp(raw_conv.get("updated"), "conversation.updated", conv["created"])
    for key in ("model", "server_url", "profile", "lmdeploy_version"):
        conv[key] = _optional_text(raw_conv.get(key), f"conversation.{key}")
    msgs: list[dict[str, Any]] = []
    prefix = where
    for index, raw in enumerate(raw_msgs, start=1):
        where = f"{prefix}message {index}"
        if not isinstance(raw, dict):
            raise _bad_import(f"{where} must be an object")
        role = raw.get("role")
        if role not in ROLES:
            raise _bad_import(f"{where} has role {role!r}; it must be one of {', '.join(ROLES)}")
        content = raw.get("content")
        if not isinstance(content, str):
            raise _bad_import(f'{where} has no text "content"')
        state = raw.get("state", "done")
        if state not in STATES:
            raise _bad_import(f"{where} has state {state!r}; it must be one of {', '.join(STATES)}")
        if state == "streaming":  # nobody is writing it any more
            state = "interrupted"
        sampling, stats = raw.get("sampling"), raw.get("stats")
        for name, value in (("sampling", sampling), ("stats", stats)):
            if value is not None and not isinstance(value, dict):
                raise _bad_import(f'{where}: "{name}" must be an object')
        images = raw.get("images", [])
        if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
            raise _bad_import(f'{where}: "images" must be a list of file names')
        msgs.append(
            {
                "role": role,
                "content": clean(content),
                "state": state,
                "created": _timestamp(raw.get("created"), f"{where}.created", conv["created"]),
                "sampling": clean_data(sampling),
                "stats": clean_data(stats),
                "images": [name for name in (clean_line(image) for image in images) if name],
            }
        )
    return conv, msgs
