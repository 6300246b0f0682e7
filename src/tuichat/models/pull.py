"""Getting models from a hub into its standard cache, and removing cached models (`tuichat pull` / `tuichat rm`).

Downloads go through the hubs' own client libraries: `huggingface_hub` (a dependency) and ModelScope's SDK (an
optional extra), into the caches lmdeploy and transformers read, so a pulled model is found by every tool. The
plan comes from the hub's file listing (sizes, LFS sha256, git blob ids): free disk is checked against what is
still missing before the first byte, and every file is hashed after it lands. `config.json` comes last and the
revision's ref is written only at the end, so an interrupted pull never looks like a complete model to discovery.

huggingface_hub resumes a dropped connection inside the file (HTTP Range) by itself; after Ctrl+C the files
already finished stay in the cache and the next pull fetches only the rest (the library discards a partial file
of a stopped process rather than trusting it).

The hub endpoint and cache are resolved from the environment at each call (HF_ENDPOINT, HF_HUB_CACHE, HF_HOME),
not from what huggingface_hub read at import, so one process can pull against different mirrors (and tests can).
Tokens are left to the library (HF_TOKEN, the token file); tuichat only asks whether one exists, never prints it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tuichat.durations import format_duration
from tuichat.errors import TuichatError
from tuichat.models.discovery import hf_cache_dir, looks_like_hub_id, modelscope_cache_dir
from tuichat.server.gpu import format_bytes

DEFAULT_ENDPOINT = "https://huggingface.co"
# Room kept beyond the download itself: the cache's small files, lock files and the filesystem's own needs.
DISK_RESERVE = 200_000_000
# How often progress is printed: a terminal line is rewritten often, a log gets a line now and then.
TTY_INTERVAL_S = 0.2
PLAIN_INTERVAL_S = 5.0
MODELSCOPE_HINT = 'pip install "tuichat[modelscope]"'
# A stopped download is kept under this name beside the blob it becomes (the name huggingface_hub 0.x used, so
# its leftovers resume too); huggingface_hub 2.x itself writes to a per-process name and deletes it on any error.
PARTIAL_SUFFIX = ".incomplete"


class PullError(TuichatError):
    """A pull that cannot go on; the sentence says why and what to do."""


class Interrupted(TuichatError):
    """Ctrl+C during a pull: the sentence says what is kept and how to resume."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the hub's listing: its size and the hash the hub gives for it."""

    name: str
    size: int | None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git files: the git blob id (sha1 of "blob SIZE\\0" + bytes)

    @property
    def cache_key(self) -> str | None:
        """The blob's name in the Hugging Face cache (its ETag): the sha256 for LFS files, else the git blob id."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class PullPlan:
    """What a pull fetches: the repository at one commit and the files that match --include."""

    source: str  # 'hf' or 'modelscope'
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    endpoint: str
    cache_dir: Path
    gated: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def storage(self) -> Path:
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    def missing(self) -> list[RemoteFile]:
        """Files whose blob is not in the cache yet (blobs are shared between revisions, so those are free)."""
        if self.source != "hf":
            return list(self.files)
        return [f for f in self.files if not (f.cache_key and (self.storage / "blobs" / f.cache_key).is_file())]

    def partial(self, file: RemoteFile) -> Path | None:
        """Where the part of `file` fetched so far is kept between pulls (None: a file the hub gives no hash for)."""
        if self.source != "hf" or not file.cache_key:
            return None
        return self.storage / "blobs" / (file.cache_key + PARTIAL_SUFFIX)

    def partial_bytes(self, file: RemoteFile) -> int:
        """Bytes of `file` an earlier, stopped pull left (resumed, not fetched again)."""
        path = self.partial(file)
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return 0

    def to_fetch(self) -> int:
        """Bytes still to download: the missing files less the parts already here."""
        return sum(max(0, (f.size or 0) - self.partial_bytes(f)) for f in self.missing())


@dataclass(frozen=True)
class PullResult:
    plan: PullPlan
    path: Path  # the model folder to hand to lmdeploy
    downloaded_files: int
    downloaded_bytes: int
    elapsed_s: float


# ---------------------------------------------------------------- progress


class PullCancelled(Exception):
    """Raised inside a download when `PullProgress.cancel()` was called (from another thread: the UI's Esc)."""


@dataclass(frozen=True)
class ProgressView:
    """One moment of a pull, for a progress bar: the current file and the whole pull."""

    index: int  # 1-based position of the current file
    count: int
    name: str
    file_have: int  # bytes of this file on disk now (a resumed part included)
    file_size: int | None
    file_rate: float  # bytes a second, this file, this run
    done: int  # bytes fetched this run, every file
    total: int  # bytes this run has to fetch
    rate: float

    @property
    def left_s(self) -> float | None:
        if self.rate <= 0 or self.total <= self.done:
            return None
        return (self.total - self.done) / self.rate

    @property
    def percent(self) -> int:
        return min(100, self.done * 100 // self.total) if self.total else 100

    def file_text(self) -> str:
        part = format_bytes(self.file_have)
        if self.file_size:
            part += f"/{format_bytes(self.file_size)}"
        return f"[{self.index}/{self.count}] {self.name} {part} {format_bytes(self.file_rate)}/s"

    def overall_text(self) -> str:
        text = f"all {format_bytes(self.done)}/{format_bytes(self.total)}"
        if self.total:
            text += f" ({self.percent}%)"
        text += f" {format_bytes(self.rate)}/s"
        left = self.left_s
        if left is not None:
            text += f", {format_duration(left)} left"
        return text


class PullProgress:
    """What a pull reports while it runs: counts bytes and calls `show`, `file_finished` and `note`.

    Front ends subclass it (the CLI's `ProgressPrinter`, the models screen's reporter); the calls come from the
    thread that pulls. `cancel()` may be called from any thread: the download stops at its next chunk, keeping
    the part already fetched for the next pull to resume.
    """

    interval_s = TTY_INTERVAL_S

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.total = 0
        self.done = 0  # bytes of finished and current files, this run
        self.index = 0
        self.count = 0
        self.file: RemoteFile | None = None
        self.file_done = 0  # bytes of the current file fetched this run
        self.file_base = 0  # bytes of the current file already on disk when it started (a resumed part)
        self._start = 0.0
        self._file_start = 0.0
        self._last_show = -1e9
        self._cancel = threading.Event()

    # -- driven by the pull

    def begin(self, total: int, count: int) -> None:
        self.total, self.count = total, count
        self._start = self.clock()

    def start_file(self, index: int, file: RemoteFile) -> None:
        self.check_cancelled()
        self.index, self.file, self.file_done, self.file_base = index, file, 0, 0
        self._file_start = self.clock()
        self._last_show = -1e9

    def resumed_at(self, offset: int) -> None:
        """The current file goes on from `offset` bytes already on disk."""
        self.file_base = offset
        if offset and self.file is not None:
            self.note(f"resuming {self.file.name} at {format_bytes(offset)}: that part was fetched before")

    def advance(self, n: int) -> None:
        self.check_cancelled()
        self.file_done += n
        self.done += n
        now = self.clock()
        if now - self._last_show >= self.interval_s:
            self._last_show = now
            self.show(self.view(now))

    def finish_file(self, verified: str) -> None:
        file = self.file
        if file is None:
            return
        elapsed = self.clock() - self._file_start
        got = f"{format_bytes(self.file_done)} in {format_duration(elapsed)}" if self.file_done else "already here"
        if self.file_done and self.file_base:
            got += f" (resumed at {format_bytes(self.file_base)})"
        self.file_finished(f"[{self.index}/{self.count}] {file.name}: {got}, {verified}")

    def view(self, now: float | None = None) -> ProgressView:
        now = self.clock() if now is None else now
        file = self.file
        return ProgressView(
            index=self.index,
            count=self.count,
            name=file.name if file else "?",
            file_have=self.file_base + self.file_done,
            file_size=file.size if file else None,
            file_rate=self.file_done / max(now - self._file_start, 1e-6),
            done=self.done,
            total=self.total,
            rate=self.done / max(now - self._start, 1e-6),
        )

    # -- cancelling

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise PullCancelled

    # -- what a front end shows

    def show(self, view: ProgressView) -> None:
        """The current numbers (called at most every `interval_s`)."""

    def file_finished(self, line: str) -> None:
        """A file is in the cache and checked: one line about it."""

    def note(self, text: str) -> None:
        """Something worth a line of its own (the plan, a resumed file, a dropped connection)."""


class ProgressPrinter(PullProgress):
    """Per-file and overall progress: one rewritten line on a terminal, plain lines now and then elsewhere."""

    def __init__(self, out: TextIO, tty: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.out = out
        self.tty = tty
        self.interval_s = TTY_INTERVAL_S if tty else PLAIN_INTERVAL_S
        self._line_open = False

    def show(self, view: ProgressView) -> None:
        text = f"{view.file_text()} | {view.overall_text()}"
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
            self._line_open = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def file_finished(self, line: str) -> None:
        self._end_line()
        self.out.write(line + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self._end_line()
        self.out.write(text + "\n")
        self.out.flush()

    def _end_line(self) -> None:
        if self._line_open:
            self.out.write("\r\x1b[2K")
            self._line_open = False


def _bar_class(progress: PullProgress) -> type:
    """A stand-in for tqdm that huggingface_hub drives (it only creates, updates and closes its bars)."""

    class Bar:
        def __init__(self, *args: object, **kwargs: object) -> None:
            total = kwargs.get("total")
            self.total = total if isinstance(total, int) else None
            self.n = 0
            self.format_dict: dict[str, object] = {}
            initial = kwargs.get("initial")
            if isinstance(initial, int) and initial:
                self.n = initial

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            step = int(n or 0)
            self.n += step
            progress.advance(step)

        def close(self) -> None:
            return None

        def refresh(self, *args: object, **kwargs: object) -> None:
            return None

        def set_postfix_str(self, *args: object, **kwargs: object) -> None:
            return None

        def set_description(self, *args: object, **kwargs: object) -> None:
            return None

    return Bar


# ---------------------------------------------------------------- environment


def hf_endpoint(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _hf_offline(env: Mapping[str, str]) -> bool:
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would, once its missing parents are made)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free


def _has_token() -> bool:
    from huggingface_hub import get_token

    try:
        return get_token() is not None
    except Exception:  # an unreadable token file is the same as none here
        return False


def _no_internet(where: str, why: str) -> PullError:
    return PullError(
        f"Cannot reach {where} ({why}): this machine seems to have no internet access, or the hub is blocked. "
        "Point HF_ENDPOINT at a mirror you can reach (for example HF_ENDPOINT=https://hf-mirror.com), or download "
        "the model on another machine, copy its folder here and list it with `tuichat models --root DIR`."
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def hub_error(exc: BaseException, repo_id: str, endpoint: str, revision: str) -> PullError | None:
    """The sentence for an exception huggingface_hub raised; None for one that is not about the hub."""
    from huggingface_hub import errors

    if isinstance(exc, errors.OfflineModeIsEnabled):
        return PullError(
            "Hugging Face offline mode is on (HF_HUB_OFFLINE=1), so nothing can be downloaded: unset HF_HUB_OFFLINE "
            "to pull, or copy the model folder here and list it with `tuichat models --root DIR`."
        )
    if isinstance(exc, errors.GatedRepoError):
        if _has_token():
            return PullError(
                f"{repo_id} is gated and your Hugging Face token has no access to it yet: accept its terms on "
                f"{endpoint}/{repo_id} with the account the token belongs to, then pull again."
            )
        return PullError(
            f"{repo_id} is gated: accept its terms on {endpoint}/{repo_id}, then give tuichat your token "
            "(set HF_TOKEN, or run `hf auth login`) and pull again."
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return PullError(
            f"{repo_id} has no revision '{revision}': give a branch, tag or commit that exists (--revision), "
            "or leave --revision out for main."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        private = " If it is private, set HF_TOKEN or run `hf auth login`." if not _has_token() else ""
        return PullError(
            f"{repo_id} was not found on {endpoint}: check the spelling (owner/name, for example "
            f"internlm/internlm2-chat-1_8b).{private}"
        )
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return PullError(
            f"A file of {repo_id} vanished from {endpoint} while pulling: the repository changed; pull again."
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        return _no_internet(endpoint, _short(cause) if cause else "no answer")
    if _is_transport_error(exc):
        return _no_internet(endpoint, _short(exc))
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return PullError(
            f"The hub at {endpoint} answered HTTP {status} for {repo_id}: try again later, or use a mirror "
            "through HF_ENDPOINT."
        )
    if isinstance(exc, PermissionError):
        return PullError(
            f"Cannot write into the cache ({exc.filename or exc}): fix its permissions, or point HF_HOME at a folder "
            "you can write to."
        )
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return PullError(
            "The disk filled up during the download: free some space (or point HF_HOME at a bigger disk) and pull "
            "again; the files already finished are kept."
        )
    return None


# The HTTP stack under huggingface_hub changed between releases (requests, httpx, httpx2): judge by class names.
_TRANSPORT_NAMES = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "TransportError", "Timeout"}
_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _is_transport_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in _TRANSPORT_MODULES and (
            cls.__name__ in _TRANSPORT_NAMES or cls.__name__ == "ConnectionError"
        ):
            return True
    return False


def is_cached(repo_id: str, revision: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """Whether the Hugging Face cache holds a usable snapshot of `repo_id` (at `revision`: a branch, tag or commit;
    default main), with its config.json, so lmdeploy can load it without downloading anything."""
    text = repo_id.strip().strip("/")
    if not looks_like_hub_id(text):
        return False
    storage = hf_cache_dir(env) / ("models--" + text.replace("/", "--"))
    rev = (revision or "main").strip()
    try:
        commit = (storage / "refs" / rev).read_text().strip()
    except (OSError, ValueError):
        commit = rev  # a commit given directly, or a ref this cache does not know
    return bool(commit) and "/" not in commit and (storage / "snapshots" / commit / "config.json").is_file()


def hub_reachable(env: Mapping[str, str] | None = None, timeout: float = 4.0) -> bool:
    """Whether the Hugging Face hub (or the HF_ENDPOINT mirror) answers at all; False in offline mode."""
    env = os.environ if env is None else env
    if _hf_offline(env):
        return False
    import httpx

    try:
        return httpx.head(hf_endpoint(env), timeout=timeout, follow_redirects=False).status_code < 500
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------- planning


def match_include(names: Iterable[str], include: Sequence[str]) -> list[str]:
    """The names that match any of the shell-style patterns (all names when there are none), hub order kept."""
    names = list(names)
    if not include:
        return names
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]


def _check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip().strip("/")
    if not looks_like_hub_id(repo_id):
        raise PullError(
            f"'{repo_id}' is not a hub id: give owner/name, for example internlm/internlm2-chat-1_8b "
            "(a local folder needs no pull: list it with `tuichat models --root DIR`)."
        )
    return repo_id


def plan_hf(
    repo_id: str,
    revision: str | None = None,
    include: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> PullPlan:
    """Ask the hub for the repository's files at `revision` (sizes and hashes); no download yet."""
    env = os.environ if env is None else env
    repo_id = _check_repo_id(repo_id)
    endpoint = hf_endpoint(env)
    revision = revision or "main"
    if _hf_offline(env):
        raise PullError(
            "Hugging Face offline mode is on (HF_HUB_OFFLINE=1), so nothing can be downloaded: unset HF_HUB_OFFLINE "
            "to pull, or copy the model folder here and list it with `tuichat models --root DIR`."
        )
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
    except Exception as exc:
        mapped = hub_error(exc, repo_id, endpoint, revision)
        if mapped is None:  # a mirror that answers, but not in the hub's API (HTML, another JSON)
            mapped = PullError(
                f"{endpoint} gave an answer that is not the Hugging Face hub API ({_short(exc)}): check HF_ENDPOINT."
            )
        raise mapped from None
    siblings = info.siblings or []
    by_name = {s.rfilename: s for s in siblings}
    names = match_include(by_name, include)
    if not names:
        listed = ", ".join(sorted(by_name)[:8]) or "none"
        raise PullError(
            f"No file of {repo_id} matches --include {' '.join(include)} (files: {listed}): "
            "check the pattern (shell style, for example '*.json' or '*.safetensors')."
        )
    files = []
    for name in names:
        s = by_name[name]
        sha = s.lfs.sha256 if s.lfs is not None else None
        size = s.lfs.size if s.lfs is not None else s.size
        files.append(RemoteFile(name=name, size=size, sha256=sha, blob_id=None if sha else s.blob_id))
    if not info.sha:
        raise PullError(
            f"The hub at {endpoint} did not say which commit {repo_id} is at: if HF_ENDPOINT points at a mirror, "
            "check that it serves the Hugging Face API."
        )
    return PullPlan(
        source="hf",
        repo_id=repo_id,
        revision=revision,
        commit=info.sha,
        files=_config_last(files),
        endpoint=endpoint,
        cache_dir=hf_cache_dir(env),
        gated=bool(info.gated),
    )


def _config_last(files: list[RemoteFile]) -> list[RemoteFile]:
    # Discovery takes a folder with config.json for a model: it must be the last file to arrive.
    return sorted(files, key=lambda f: f.name == "config.json")


def check_disk(plan: PullPlan, free_probe: Callable[[Path], int] = disk_free) -> int:
    """Bytes still to download; raises when the cache's disk cannot hold them."""
    need = plan.to_fetch()
    if need == 0:
        return 0
    free = free_probe(plan.cache_dir)
    if need + DISK_RESERVE > free:
        raise PullError(
            f"{plan.repo_id} needs {format_bytes(need)} more on disk but only {format_bytes(free)} is free where the "
            f"cache is ({plan.cache_dir}): free some space, point HF_HOME (or HF_HUB_CACHE) at a bigger disk, or "
            "fetch fewer files with --include. Nothing was downloaded."
        )
    return need


# ---------------------------------------------------------------- hashes


def file_digest(path: Path, algorithm: str, size: int | None = None) -> str:
    """sha256 of the file, or with algorithm 'git' its git blob id."""
    if algorithm == "git":
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"blob {size if size is not None else path.stat().st_size}\0".encode())
    else:
        h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, file: RemoteFile) -> str | None:
    """None when the file is what the hub listed, else what is wrong (a phrase)."""
    try:
        actual_size = path.stat().st_size
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if file.size is not None and actual_size != file.size:
        return f"it has {actual_size} bytes, the hub lists {file.size}"
    if file.sha256:
        if file_digest(path, "sha256") != file.sha256.lower():
            return "its sha256 does not match the hub's"
    elif file.blob_id and file_digest(path, "git", actual_size) != file.blob_id.lower():
        return "its git blob id does not match the hub's"
    return None


def _verified_word(file: RemoteFile) -> str:
    if file.sha256:
        return "sha256 ok"
    if file.blob_id:
        return "git hash ok"
    return "size ok"


def _discard(pointer: Path) -> None:
    """Remove a bad file from the cache: the snapshot's link and the blob it points at."""
    try:
        blob = pointer.resolve() if pointer.is_symlink() else None
    except OSError:
        blob = None
    pointer.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


# ---------------------------------------------------------------- pulling


def pull(
    plan: PullPlan,
    progress: PullProgress,
    *,
    free_probe: Callable[[Path], int] = disk_free,
) -> PullResult:
    """Download what the plan lists into the hub's cache, verifying each file.

    Ctrl+C (KeyboardInterrupt) or `progress.cancel()` raises Interrupted; the part of the file being fetched is
    kept (as `<blob>.incomplete`, which nothing takes for a finished file) and the next pull resumes it.
    """
    if plan.source == "modelscope":
        return _pull_modelscope(plan, progress, free_probe)
    need = check_disk(plan, free_probe)
    started = time.monotonic()
    progress.note(
        f"pulling {plan.repo_id} ({plan.revision} = {plan.commit[:12]}) from {plan.endpoint}: {len(plan.files)} "
        f"files, {format_bytes(plan.total_bytes)} ({format_bytes(need)} to download) into {plan.cache_dir}"
    )
    progress.begin(need, len(plan.files))
    bar = _bar_class(progress)
    with _resume_notes(progress):
        return _download_all(plan, progress, bar, started)


@contextlib.contextmanager
def _resume_notes(progress: PullProgress) -> Iterator[None]:
    """huggingface_hub logs a warning (with the URL) each time it resumes a dropped download: say it plainly."""
    import logging

    def translate(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Trying to resume download" in message:
            name = progress.file.name if progress.file else "a file"
            progress.note(f"the connection dropped during {name}: resuming where it stopped")
            return False
        return True

    logger = logging.getLogger("huggingface_hub.file_download")
    logger.addFilter(translate)
    try:
        yield
    finally:
        logger.removeFilter(translate)


def _download_all(plan: PullPlan, progress: PullProgress, bar: type, started: float) -> PullResult:
    from huggingface_hub import hf_hub_download

    fetched = 0
    fetched_bytes = 0
    for index, file in enumerate(plan.files, 1):
        try:
            progress.start_file(index, file)
            checked = _fetch_blob(plan, file, progress, bar)
            # the snapshot's link (and the ref) as huggingface_hub lays them out; with the blob already in
            # place it only links it, else (a file without a hash) it downloads the file itself
            local = Path(
                hf_hub_download(
                    plan.repo_id,
                    file.name,
                    revision=plan.commit,
                    cache_dir=plan.cache_dir,
                    endpoint=plan.endpoint,
                    tqdm_class=bar,
                )
            )
        except (KeyboardInterrupt, PullCancelled):
            raise Interrupted(_interrupted_sentence(plan, index - 1, file)) from None
        except PullError:
            raise
        except Exception as exc:
            mapped = hub_error(exc, plan.repo_id, plan.endpoint, plan.revision)
            if mapped is None:
                raise
            raise mapped from None
        if progress.file_done:
            fetched += 1
            fetched_bytes += progress.file_done
        problem = None if checked else verify(local, file)
        if problem is not None:
            _discard(local)
            raise _corrupt(plan, file, problem)
        progress.finish_file(_verified_word(file))
    _write_ref(plan)
    return PullResult(plan, plan.snapshot, fetched, fetched_bytes, time.monotonic() - started)


def _corrupt(plan: PullPlan, file: RemoteFile, problem: str) -> PullError:
    return PullError(
        f"{file.name} of {plan.repo_id} arrived corrupt ({problem}), so it was removed from the cache: pull "
        "again to fetch it anew; if it happens again, the hub or mirror (HF_ENDPOINT) serves a bad copy."
    )


def _fetch_blob(plan: PullPlan, file: RemoteFile, progress: PullProgress, bar: type) -> bool:
    """Put `file`'s blob into the cache through a partial file that outlives the process; True when checked.

    huggingface_hub 2.x downloads into a file named per process and deletes it on any error, Ctrl+C included,
    so a stopped pull would start that file from zero. Here the bytes go into `<blob>.incomplete`, which a
    later pull continues with an HTTP Range request through the library's own `http_get` (same headers, token,
    retries and error types). Only a file that matches the hub's hash becomes the blob. Files without a hash
    (nothing to name the blob by) and files too large for plain HTTP (the hub serves those through Xet only)
    are left to `hf_hub_download`, which cannot resume them across runs.
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.file_download import http_get

    # public as huggingface_hub.utils.*, but that package's lazy exports hide them from mypy
    from huggingface_hub.utils._fixes import WeakFileLock
    from huggingface_hub.utils._headers import build_hf_headers

    partial = plan.partial(file)
    if partial is None or file.cache_key is None or (file.size or 0) > constants.MAX_HTTP_DOWNLOAD_SIZE:
        return False
    blob = partial.with_name(file.cache_key)
    if blob.is_file():
        return False  # already here (another revision shares it): hf_hub_download links it, verify checks it
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = plan.cache_dir / ".locks" / plan.storage.name / f"{file.cache_key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(plan.repo_id, file.name, revision=plan.commit, endpoint=plan.endpoint)
    with WeakFileLock(lock):  # the lock huggingface_hub takes for this blob: two pulls never append to one part
        for attempt in (1, 2):
            have = plan.partial_bytes(file)
            if file.size is not None and have > file.size:
                partial.unlink()  # longer than the file: not a part of it
                have = 0
            progress.resumed_at(have)
            try:
                with partial.open("ab") as out:
                    http_get(
                        url,
                        out,
                        resume_size=have,
                        headers=build_hf_headers(),
                        expected_size=file.size,
                        displayed_filename=file.name,
                        tqdm_class=bar,
                    )
            except BaseException:
                if partial.stat().st_size == 0:
                    partial.unlink()  # nothing came (a refusal, a stop before the first chunk): nothing to keep
                raise
            problem = verify(partial, file)
            if problem is None:
                os.replace(partial, blob)
                return True
            partial.unlink(missing_ok=True)
            if not have or attempt == 2:
                raise _corrupt(plan, file, problem)
            # the kept part came from an earlier pull and may be what is wrong: fetch the whole file once more
            progress.note(f"{file.name} did not match its hash after resuming: fetching it again from the start")
            progress.file_done = 0
    return False  # not reached: the second attempt returns or raises


def _write_ref(plan: PullPlan) -> None:
    # The revision's name -> commit, as huggingface_hub keeps it, so tools find the model offline by its name.
    if plan.revision == plan.commit:
        return
    ref = plan.storage / "refs" / plan.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(plan.commit)


def _interrupted_sentence(plan: PullPlan, finished: int, current: RemoteFile | None = None) -> str:
    kept = ""
    part = plan.partial_bytes(current) if current is not None else 0
    if current is not None and part:
        size = f" of {format_bytes(current.size)}" if current.size else ""
        kept = f"; the {format_bytes(part)}{size} of {current.name} fetched so far are kept and resume"
    elif current is not None and plan.partial(current) is None:
        kept = f"; {current.name} has no hash to resume it by and starts again"
    return (
        f"Stopped: {finished} of {len(plan.files)} files of {plan.repo_id} are in the cache{kept}. Pull it again "
        "to fetch the rest; nothing already here is downloaded again."
    )


# ---------------------------------------------------------------- ModelScope (optional SDK)


def _modelscope(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PullError(
            f"Pulling from ModelScope needs its SDK, which is not installed: {MODELSCOPE_HINT} "
            "(or pip install modelscope), or pull from the Hugging Face hub with --source hf."
        ) from None


def plan_modelscope(
    repo_id: str, revision: str | None = None, include: Sequence[str] = (), *, env: Mapping[str, str] | None = None
) -> PullPlan:
    env = os.environ if env is None else env
    repo_id = _check_repo_id(repo_id)
    api_mod = _modelscope("modelscope.hub.api")
    revision = revision or "master"
    endpoint = env.get("MODELSCOPE_DOMAIN") or "modelscope.cn"
    try:
        listing = api_mod.HubApi().get_model_files(repo_id, revision=revision, recursive=True)
    except Exception as exc:  # the SDK raises requests' and its own types; each becomes one sentence
        raise _modelscope_error(exc, repo_id, endpoint) from None
    files = [
        RemoteFile(name=str(e["Path"]), size=int(e.get("Size") or 0), sha256=(e.get("Sha256") or None))
        for e in listing
        if isinstance(e, dict) and e.get("Type", "blob") != "tree"
    ]
    wanted = set(match_include([f.name for f in files], include))
    files = [f for f in files if f.name in wanted]
    if not files:
        raise PullError(f"No file of {repo_id} on ModelScope matches --include {' '.join(include)}: check the pattern.")
    return PullPlan("modelscope", repo_id, revision, revision, _config_last(files), endpoint, modelscope_cache_dir(env))


def _modelscope_error(exc: BaseException, repo_id: str, endpoint: str) -> PullError:
    text = _short(exc)
    name = type(exc).__name__
    if "Connection" in name or "Timeout" in name or "resolve" in text.lower():
        return PullError(
            f"Cannot reach ModelScope ({endpoint}: {text}): this machine seems to have no internet access. Set "
            "MODELSCOPE_DOMAIN to a mirror you can reach, or copy the model folder here and list it with "
            "`tuichat models --root DIR`."
        )
    if "404" in text or "not exist" in text.lower() or "NotExist" in name:
        return PullError(f"{repo_id} was not found on ModelScope: check the spelling (owner/name).")
    return PullError(f"ModelScope refused {repo_id} ({text}): check the id, your login (modelscope login) and retry.")


def _pull_modelscope(plan: PullPlan, progress: PullProgress, free_probe: Callable[[Path], int]) -> PullResult:
    check_disk(plan, free_probe)
    snap = _modelscope("modelscope.hub.snapshot_download")
    started = time.monotonic()
    progress.note(
        f"pulling {plan.repo_id} ({plan.revision}) from ModelScope ({plan.endpoint}): {len(plan.files)} files, "
        f"{format_bytes(plan.total_bytes)} into {plan.cache_dir} (progress as ModelScope's SDK shows it)"
    )
    try:
        folder = Path(
            snap.snapshot_download(
                plan.repo_id, revision=plan.revision, allow_patterns=[f.name for f in plan.files] or None
            )
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"Stopped: some of the {len(plan.files)} files of {plan.repo_id} are in the ModelScope cache. Run the "
            "same pull again to fetch the rest."
        ) from None
    except Exception as exc:  # as in plan_modelscope
        raise _modelscope_error(exc, plan.repo_id, plan.endpoint) from None
    for index, file in enumerate(plan.files, 1):
        progress.start_file(index, file)
        problem = verify(folder / file.name, file)
        if problem is not None:
            (folder / file.name).unlink(missing_ok=True)
            raise PullError(
                f"{file.name} of {plan.repo_id} arrived corrupt ({problem}), so it was removed: pull again to fetch it "
                "anew."
            )
        progress.finish_file("sha256 ok" if file.sha256 else "size ok")
    return PullResult(plan, folder, len(plan.files), plan.total_bytes, time.monotonic() - started)


def make_plan(
    repo_id: str,
    *,
    source: str = "hf",
    revision: str | None = None,
    include: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> PullPlan:
    if source == "modelscope":
        return plan_modelscope(repo_id, revision, include, env=env)
    return plan_hf(repo_id, revision, include, env=env)


def default_progress(out: TextIO | None = None) -> ProgressPrinter:
    out = out or sys.stdout
    return ProgressPrinter(out, tty=out.isatty())


# ---------------------------------------------------------------- removing


@dataclass(frozen=True)
class Removable:
    """A model `tuichat rm` can take away: what is deleted and how much that frees."""

    name: str
    kind: str  # 'hf-cache', 'modelscope-cache', 'folder' or 'link'
    path: Path  # the repo folder, model folder or symlink that goes
    frees: int
    hf_revisions: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return {
            "hf-cache": "the Hugging Face cache",
            "modelscope-cache": "the ModelScope cache",
            "link": "a link under a models root",
        }.get(self.kind, "a models root")


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path`, links not followed: what deleting the folder frees."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
    except ValueError:
        return False
    return True


def find_removable(model: str, roots: Sequence[Path], *, env: Mapping[str, str] | None = None) -> Removable:
    """The cached repo or local model folder `model` names (a hub id, a listed name or a path)."""
    env = os.environ if env is None else env
    text = model.strip().rstrip("/")
    cache = hf_cache_dir(env)
    if looks_like_hub_id(text):
        hit = _hf_cached(text, cache)
        if hit is not None:
            return hit
    from tuichat.models.discovery import discover

    found = discover(list(roots), include_caches=True, env=env).models
    given = Path(text).expanduser()
    given_real = given.resolve() if given.exists() else None
    matches = [
        m
        for m in found
        if m.name == text or m.hub_id == text or (given_real is not None and m.path.resolve() == given_real)
    ]
    if not matches:
        raise TuichatError(
            f"No local model called '{text}': `tuichat models` lists what is there (give a name, hub id or path "
            "from it)."
        )
    m = matches[0]
    if _inside(m.path.absolute(), cache.absolute()) and m.hub_id:
        hit = _hf_cached(m.hub_id, cache)
        if hit is not None:
            return hit
    ms_cache = modelscope_cache_dir(env).absolute()
    if _inside(m.path.absolute(), ms_cache):
        return Removable(m.hub_id or m.name, "modelscope-cache", m.path, _tree_bytes(m.path))
    for root in roots:
        root_abs = Path(root).expanduser().absolute()
        if _inside(m.path.absolute(), root_abs) and m.path.absolute() != root_abs:
            if m.path.is_symlink():
                return Removable(m.name, "link", m.path, 0)
            return Removable(m.name, "folder", m.path, _tree_bytes(m.path))
    raise TuichatError(
        f"{m.path} is not in a hub cache or under a models root, so tuichat leaves it alone: delete it yourself "
        "if you mean to."
    )


def _hf_cached(repo_id: str, cache: Path) -> Removable | None:
    from huggingface_hub import CacheNotFound, scan_cache_dir

    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        return None
    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return Removable(repo_id, "hf-cache", folder, _tree_bytes(folder))
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            revisions = tuple(r.commit_hash for r in repo.revisions)
            frees = info.delete_revisions(*revisions).expected_freed_size if revisions else 0
            return Removable(repo_id, "hf-cache", repo.repo_path, max(frees, _tree_bytes(folder)), revisions)
    # a folder the scan found broken (an interrupted first pull): still the user's to remove
    return Removable(repo_id, "hf-cache", folder, _tree_bytes(folder))


def uses(target: Removable, model: str) -> bool:
    """Whether a server whose profile names `model` reads from `target`."""
    if target.kind in ("hf-cache", "modelscope-cache") and model.strip() == target.name:
        return True
    path = Path(model).expanduser()
    gone = {target.path.absolute(), target.path.resolve()}
    try:
        candidates = {path.absolute(), path.resolve()}
    except OSError:
        candidates = {path.absolute()}
    return any(c == g or _inside(c, g) for c in candidates for g in gone)


def remove(target: Removable, *, env: Mapping[str, str] | None = None) -> None:
    """Delete it: hub cache repos through huggingface_hub's cache API, folders and links directly."""
    env = os.environ if env is None else env
    if target.kind == "link":
        target.path.unlink()
        return
    if target.kind == "hf-cache":
        cache = hf_cache_dir(env)
        if target.hf_revisions:
            from huggingface_hub import scan_cache_dir

            scan_cache_dir(cache).delete_revisions(*target.hf_revisions).execute()
        # what the cache API leaves (refs of a broken pull, .no_exist, locks) goes too
        shutil.rmtree(target.path, ignore_errors=True)
        shutil.rmtree(cache / ".locks" / target.path.name, ignore_errors=True)
        if target.path.exists():
            raise TuichatError(f"{target.path} could not be removed completely: check its permissions.")
        return
    shutil.rmtree(target.path)
