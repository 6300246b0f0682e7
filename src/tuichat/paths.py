"""Where tuichat keeps its files: config, data (conversations) and state (servers, logs).

`TUICHAT_HOME=DIR` puts all three under one folder, which keeps tests hermetic and lets a user carry a
whole setup around; otherwise the platform's usual locations (XDG on Linux) come from platformdirs.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    """Write `text` atomically to a 0600 file: the file never exists with wider permissions, and a write that fails
    or dies half-way leaves the old file as it was (the text goes to a temporary file renamed over it)."""
    ensure_private_dir(path.parent)
    # mkstemp: a name no other writer (thread, or process with a recycled pid) can share, created 0600 exclusively.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable: after a power cut the file is the old one or the new one, not missing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock, released on exit or when the process dies).

    Two tuichat processes on one home each read, change and rewrite config.toml; the lock makes those edits
    take turns, so neither loses the other's change. Locking the folder leaves no lock file behind.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
