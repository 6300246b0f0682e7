"""Which server to talk to: command line, then OpenAI's environment variables, then the config file.

`OPENAI_BASE_URL` conventionally ends in `/v1` (the OpenAI SDK adds paths under it); tuichat's client adds the
`/v1/...` paths itself, so a trailing `/v1` is dropped rather than doubled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuichat.client import DEFAULT_URL
from tuichat.config import Config
from tuichat.errors import TuichatError


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str | None
    model: str | None
    source: str  # where the URL came from: "--url", "OPENAI_BASE_URL", "config", "default"


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise TuichatError(f"'{url}' is not an http:// or https:// address")
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    import httpx

    try:
        port = httpx.URL(url).port
    except (httpx.InvalidURL, ValueError) as exc:
        raise TuichatError(f"'{url}' is not a usable server address: {exc}") from None
    if port is not None and not 0 < port < 65536:
        raise TuichatError(f"'{url}' has port {port}; a port is a number from 1 to 65535")
    return url


def resolve_target(
    cfg: Config,
    env: Mapping[str, str],
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
) -> Target:
    if url:
        chosen, source = url, "--url"
    elif env.get("OPENAI_BASE_URL"):
        chosen, source = env["OPENAI_BASE_URL"], "OPENAI_BASE_URL"
    elif cfg.server.url:
        chosen, source = cfg.server.url, "config"
    else:
        chosen, source = DEFAULT_URL, "default"
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
    return Target(normalise_url(chosen), key, model or cfg.server.model, source)
