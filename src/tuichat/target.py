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
    key = api_key or env.get("OPENAI_API_KEY") or cfg.server.api_key or None
    return Target(normalise_url(chosen), key, model or cfg.server.model, source)
