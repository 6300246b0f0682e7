"""Which server to talk to: command line, then OpenAI's environment variables, then the config file.

`OPENAI_BASE_URL` conventionally ends in `/v1` (the OpenAI SDK adds paths under it); tuichat's client adds the
`/v1/...` paths itself, so a trailing `/v1` is dropped rather than doubled.

Every address is checked here, before anything connects or opens: httpx accepts nearly any string as a URL
(`http://not a url` becomes the host `not%20a%20url`), and the user would otherwise learn of a typo only as a
"cannot reach" message that blames the server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from tuichat.chat.client import DEFAULT_URL
from tuichat.config import Config
from tuichat.errors import TuichatError

# How each source is named in a message, so the user knows what to edit.
_WHERE = {
    "--url": "--url",
    "OPENAI_BASE_URL": "OPENAI_BASE_URL",
    "config": "the config's [server] url",
    "default": "the default URL",
}
_FIX = {
    "OPENAI_BASE_URL": "Fix or unset OPENAI_BASE_URL",
    "config": "Fix url under [server] in the config",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
# A DNS name (underscores allowed: container and compose service names use them) or a dotted IPv4 address.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
EXAMPLE = "http://127.0.0.1:23333"


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str | None
    model: str | None
    source: str  # where the URL came from: "--url", "OPENAI_BASE_URL", "config", "default"


class UrlError(TuichatError):
    """A server address that cannot be used; the message names where it came from and how to write one."""


def _refuse(url: str, source: str, why: str, suggestion: str | None = None, where: str | None = None) -> UrlError:
    where = where or _WHERE.get(source, source)
    fix = (
        f"did you mean {suggestion}?"
        if suggestion
        else f"give one like {EXAMPLE} (http:// or https://, a host, a port)."
    )
    fix = f"{_FIX[source]}: {fix}" if source in _FIX else fix[0].upper() + fix[1:]
    return UrlError(f"{where} {url!r} is not a server address: {why}. {fix}")


def normalise_url(url: str, source: str = "--url", where: str | None = None) -> str:
    """`url` as the client wants it (scheme, host, port, optional path; no trailing `/` or `/v1`).

    A bare `host[:port]` means `http://host[:port]`. Anything else that is not an http(s) address with a host
    raises `UrlError`, naming `source` ("--url", "OPENAI_BASE_URL", "config") so the user knows what to fix;
    `where` names it more exactly (the config file and key).
    """

    def refuse(why: str, suggestion: str | None = None) -> UrlError:
        return _refuse(url, source, why, suggestion, where)

    text = url.strip()
    if not text:
        raise refuse("it is empty")
    if not text.isprintable():
        raise refuse("it has control characters in it")
    if any(c.isspace() for c in text):
        raise refuse("it has spaces in it")
    match = _SCHEME.match(text)
    if match and match.group(2):
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise refuse(f"tuichat talks to servers over http:// or https://, not {scheme}://")
        rest = text[match.end() :]
    elif match and match.group(1).lower() in ("http", "https"):
        # "http:host" or "http:/host": a slash short, not a host called "http"
        rest = text[match.end() :].lstrip("/")
        raise refuse("it lacks the // after the scheme", f"{match.group(1).lower()}://{rest}")
    elif re.match(r"^https?//", text, re.IGNORECASE):
        scheme, _, rest = text.partition("//")
        raise refuse("it lacks the : after the scheme", f"{scheme.lower()}://{rest}")
    else:
        scheme, rest = "http", text
    if "?" in rest or "#" in rest:
        raise refuse("a server address has no ?query or #fragment")
    full = f"{scheme}://{rest}"
    # The standard library's parser, not httpx's: importing httpx costs ~70 ms, and this runs before the first frame.
    try:
        parsed = urlsplit(full)
    except ValueError as exc:  # unbalanced [ ] around an IPv6 address
        raise refuse(str(exc)) from None
    host = parsed.hostname or ""
    try:
        port = parsed.port
    except ValueError as exc:
        if "out of range" not in str(exc):
            raise refuse("its port must be a number from 1 to 65535") from None
        port = None  # said below with the number itself
    if not host:
        raise refuse("it has no host", f"http://127.0.0.1:{port}" if port else None)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise refuse(f"[{host}] is not an IPv6 address") from None
    else:
        if not _HOST.match(host):
            raise refuse(f"{host!r} is not a host name or IP address")
        if host.isdigit() and not match and ":" not in rest:
            raise refuse("that looks like a port alone", f"http://127.0.0.1:{host}")
    explicit_port = re.match(r"^(?:[^@/]*@)?(?:\[[^\]]*\]|[^:/]*):(\d+)", rest)
    number = int(explicit_port.group(1)) if explicit_port else port
    if number is not None and not 0 < number < 65536:
        raise refuse(f"port {number} is out of range; a port is a number from 1 to 65535")
    full = full.rstrip("/")
    if full.endswith("/v1"):
        full = full[: -len("/v1")]
    return full


def resolve_target(
    cfg: Config,
    env: Mapping[str, str],
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
) -> Target:
    """The server, key and model to use. Raises `UrlError` for an unusable address, naming where it came from."""
    if url is not None:  # `--url ""` is a mistake to report, not a reason to fall back to another server
        chosen, source = url, "--url"
    elif env.get("OPENAI_BASE_URL"):
        chosen, source = env["OPENAI_BASE_URL"], "OPENAI_BASE_URL"
    elif cfg.server.url:
        chosen, source = cfg.server.url, "config"
    else:
        chosen, source = DEFAULT_URL, "default"
    checked = normalise_url(chosen, source, f"{cfg.path}: server.url" if source == "config" else None)
    # A key goes only with the URL it belongs to: OPENAI_API_KEY with OPENAI_BASE_URL, the config's key with the
    # config's URL. `--url` elsewhere gets only an explicit --api-key, so a key never leaks to another host.
    if api_key:
        key: str | None = api_key
    elif source == "OPENAI_BASE_URL":
        key = env.get("OPENAI_API_KEY") or None
    elif source == "config":
        key = cfg.server.api_key or None
    elif source == "default":
        key = env.get("OPENAI_API_KEY") or cfg.server.api_key or None  # this machine's own default port
    else:
        key = None
    return Target(checked, key, model or cfg.server.model, source)
