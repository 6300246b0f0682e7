"""Where tuichat keeps its files: config, data (conversations) and state (servers, logs).

`TUICHAT_HOME=DIR` puts all three under one folder, which keeps tests hermetic and lets a user carry a
whole setup around; otherwise the platform's usual locations (XDG on Linux) come from platformdirs.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "tuichat"


def home() -> Path | None:
    """The folder named by TUICHAT_HOME, if set and non-empty."""
    value = os.environ.get("TUICHAT_HOME", "").strip()
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    root = home()
    if root is not None:
        return root
    import platformdirs  # imported here: start-up pays for it only when TUICHAT_HOME is unset

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    root = home()
    if root is not None:
        return root / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def state_dir() -> Path:
    root = home()
    if root is not None:
        return root / "state"
    import platformdirs

    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def config_file() -> Path:
    return config_dir() / "config.toml"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the owner only; it may hold API keys and chats."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` atomically to a 0600 file: the file never exists with wider permissions."""
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
