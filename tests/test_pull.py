"""`tuichat pull` / `rm` / `models` against a stand-in Hugging Face hub (tests/standin/hub.py, a real subprocess).

huggingface_hub reads HF_ENDPOINT, HF_HOME and friends once, at import; tuichat passes the endpoint and cache it
resolves at each call, so these tests run in-process with a fresh HF_HOME each. The `hub_constants` fixture keeps
the library's own side requests (its agent-registry fetch, the token file) inside the test too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin import hub as hubstandin

from tuichat.cli import models as modelcli
from tuichat.errors import TuichatError
from tuichat.models.pull import ProgressPrinter, PullError
from tuichat.server.gpu import GpuInfo, GpuSnapshot
from tuichat.server.launcher import ServerRecord

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
REPO = "tiny/tiny-chat"
FILES = hubstandin.model_files()


Hub = hubstandin.HubProcess


def start_hub(tmp_path: Path, *args: str) -> Hub:
    return hubstandin.start(tmp_path / "hub.log", *args)


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME in tmp_path, no token, no offline mode; returns the hub cache folder."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    # what the library fixed at import: keep its token file and side requests inside this test
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(modelcli, "_gpu_snapshot", lambda: None)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def hub(tmp_path: Path, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    h = start_hub(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.proc.kill()
    h.proc.wait()


def pull_args(repo: str = REPO, **kw: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "repo": repo,
        "revision": None,
        "source": "hf",
        "include": [],
        "profile": None,
        "no_profile": False,
        "model_command": "pull",
    }
    values.update(kw)
    return argparse.Namespace(**values)


def run_pull(args: argparse.Namespace, **kw: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = modelcli.run_pull(args, out, err, **kw)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def snapshot(cache: Path) -> Path:
    return cache / "models--tiny--tiny-chat" / "snapshots" / hubstandin.COMMIT


def assert_complete(cache: Path) -> None:
    snap = snapshot(cache)
    for name, data in FILES.items():
        assert hashlib.sha256((snap / name).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), name
    assert (cache / "models--tiny--tiny-chat" / "refs" / "main").read_text() == hubstandin.COMMIT


# ---------------------------------------------------------------- pull


def test_pull_fills_the_standard_cache_and_shows_facts_and_fit(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = GpuInfo(index=0, name="NVIDIA H200", uuid="GPU-x", mem_used=2_000_000_000, mem_total=150_000_000_000)
    monkeypatch.setattr(modelcli, "_gpu_snapshot", lambda: GpuSnapshot(0.0, (gpu,)))

    code, out, err = run_pull(pull_args())

    assert code == 0, err
    assert_complete(hub_env)  # where huggingface_hub (and so lmdeploy, transformers) looks for it
    assert "sha256 ok" in out and out.count("git hash ok") == 2
    assert "architecture: Qwen2ForCausalLM" in out and "dtype bfloat16" in out and "AWQ: no" in out
    assert "vision-language: no" in out
    assert "fit on GPU 0 (NVIDIA H200)" in out and "fits" in out
    assert f"tuichat pull {REPO} --profile tiny-chat" in out  # not a terminal: the offer is a command
    # config.json arrives last, so an interrupted pull never looks like a model
    assert str(hub.downloads()[-1]["path"]).endswith("/config.json")

    again, out2, _ = run_pull(pull_args())
    assert again == 0 and "nothing new to download" in out2
    assert len(hub.downloads()) == len(FILES)


def test_pull_with_profile_adds_a_profile_for_the_snapshot(hub: Hub, hub_env: Path) -> None:
    from tuichat.config import load_config

    code, out, err = run_pull(pull_args(profile="tiny"))

    assert code == 0, err
    assert load_config().profiles["tiny"].model == str(snapshot(hub_env))
    assert "tuichat serve tiny" in out


def test_dropped_connection_resumes_mid_file_and_hashes_match(
    tmp_path: Path, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # the library resumes from the last chunk it wrote; small chunks make a 256 kB file resumable mid-way
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    h = start_hub(tmp_path, "--drop-once", "model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    try:
        code, out, err = run_pull(pull_args(no_profile=True))
    finally:
        h.proc.kill()
        h.proc.wait()

    assert code == 0, err
    assert_complete(hub_env)
    ranges = [r["range"] for r in h.downloads() if str(r["path"]).endswith("model.safetensors")]
    assert ranges[0] is None and isinstance(ranges[1], str) and ranges[1].startswith("bytes=")
    assert int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0  # resumed, not restarted
    assert "connection dropped during model.safetensors: resuming" in out


def test_corrupt_file_is_caught_by_its_hash_and_not_left_as_complete(
    tmp_path: Path, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = start_hub(tmp_path, "--corrupt", "model.safetensors")
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    try:
        with pytest.raises(PullError) as caught:
            run_pull(pull_args())
    finally:
        h.proc.kill()
        h.proc.wait()

    text = str(caught.value)
    assert "model.safetensors" in text and "sha256 does not match" in text and "pull again" in text
    snap = snapshot(hub_env)
    assert not (snap / "model.safetensors").exists()
    assert not (snap / "config.json").exists()
    assert not (hub_env / "models--tiny--tiny-chat" / "refs" / "main").exists()
    sha = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert not (hub_env / "models--tiny--tiny-chat" / "blobs" / sha).exists()
    out = io.StringIO()
    modelcli.run_models(argparse.Namespace(root=[], no_caches=False), out, io.StringIO())
    assert "No local models found" in out.getvalue()


def test_not_enough_disk_is_refused_before_any_download(hub: Hub, hub_env: Path) -> None:
    with pytest.raises(PullError) as caught:
        run_pull(pull_args(), free_probe=lambda path: 50_000)

    text = str(caught.value)
    assert "needs 256.6 kB more on disk but only 50.0 kB is free" in text and "HF_HOME" in text
    assert "Nothing was downloaded" in text
    assert hub.downloads() == []
    assert not (hub_env / "models--tiny--tiny-chat" / "blobs").exists()


class StopDuringWeights(ProgressPrinter):
    """Ctrl+C once `after` bytes of the weights have arrived."""

    def __init__(self, after: int) -> None:
        super().__init__(io.StringIO())
        self.after = after

    def advance(self, n: int) -> None:
        super().advance(n)
        if self.file is not None and self.file.name == "model.safetensors" and self.file_done >= self.after:
            raise KeyboardInterrupt


def partial_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]


def test_ctrl_c_keeps_the_partial_file_and_the_same_command_resumes_it_with_a_range_request(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # several chunks in the 256 kB weights
    code, _, err = run_pull(pull_args(), progress=StopDuringWeights(after=64 * 1024))

    assert code == 130
    assert "1 of 3 files" in err and "of model.safetensors fetched so far are kept and resume" in err
    assert "run the same command again: tuichat pull tiny/tiny-chat" in err
    snap = snapshot(hub_env)
    assert (snap / "tokenizer_config.json").exists()
    # nothing that looks complete: no snapshot entry for the weights, no config, no ref
    assert not (snap / "model.safetensors").exists() and not (snap / "config.json").exists()
    assert not (hub_env / "models--tiny--tiny-chat" / "refs" / "main").exists()
    [part] = partial_files(hub_env)
    kept = part.stat().st_size
    assert 0 < kept < len(FILES["model.safetensors"])
    assert "No local models found" in models_text()

    code, out, err = run_pull(pull_args(no_profile=True))
    assert code == 0, err
    assert_complete(hub_env)
    assert partial_files(hub_env) == []
    weights = [r for r in hub.downloads() if str(r["path"]).endswith("model.safetensors")]
    assert [r["range"] for r in weights] == [None, f"bytes={kept}-"]  # resumed at the kept size, not from zero
    assert f"resuming model.safetensors at {kept / 1000:.1f} kB" in out
    fetched = [str(r["path"]).rsplit("/", 1)[-1] for r in hub.downloads()]
    assert fetched.count("tokenizer_config.json") == 1  # not downloaded again


def test_a_kept_part_that_spoils_the_hash_is_fetched_again_whole(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    assert run_pull(pull_args(), progress=StopDuringWeights(after=64 * 1024))[0] == 130
    [part] = partial_files(hub_env)
    part.write_bytes(b"\xff" * part.stat().st_size)  # a part that is not the start of the file

    code, out, err = run_pull(pull_args(no_profile=True))
    assert code == 0, err
    assert_complete(hub_env)
    assert "did not match its hash after resuming: fetching it again from the start" in out
    weights = [r["range"] for r in hub.downloads() if str(r["path"]).endswith("model.safetensors")]
    assert weights[-1] is None


def test_unknown_repo_says_so(hub: Hub) -> None:
    with pytest.raises(PullError, match=r"tiny/nope was not found on http://127\.0\.0\.1") as caught:
        run_pull(pull_args("tiny/nope"))
    assert "HF_TOKEN" in str(caught.value)


def test_gated_repo_without_token_says_how_and_with_token_pulls(
    hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PullError) as caught:
        run_pull(pull_args("tiny/gated-chat"))
    assert "tiny/gated-chat is gated" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert not (hub_env / "models--tiny--gated-chat" / "refs" / "main").exists()
    assert partial_files(hub_env) == []  # a refusal leaves no empty part behind

    monkeypatch.setenv("HF_TOKEN", hubstandin.GOOD_TOKEN)
    before = len(hub.downloads())
    code, out, err = run_pull(pull_args("tiny/gated-chat", no_profile=True))
    assert code == 0, err
    assert hubstandin.GOOD_TOKEN not in out + err
    with_token = hub.downloads()[before:]
    assert len(with_token) == len(FILES) and all(r["token"] for r in with_token)


def test_unreachable_hub_gives_the_no_internet_sentence_quickly(tmp_path: Path) -> None:
    from standin.harness import free_port

    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_TOKEN", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tuichat", "pull", "internlm/internlm2-chat-1_8b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "no internet access" in proc.stderr and "HF_ENDPOINT" in proc.stderr
    assert "tuichat models --root DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30


def test_modelscope_without_its_sdk_says_how_to_install(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed, whatever this machine has
    with pytest.raises(PullError, match=r'pip install "tuichat\[modelscope\]"'):
        run_pull(pull_args(source="modelscope"))


# ---------------------------------------------------------------- models / rm


def rm_args(model: str, *roots: str, yes: bool = True) -> argparse.Namespace:
    return argparse.Namespace(model=model, root=list(roots), yes=yes, model_command="rm")


def models_text() -> str:
    out = io.StringIO()
    modelcli.run_models(argparse.Namespace(root=[], no_caches=False), out, io.StringIO())
    return out.getvalue()


def test_models_lists_size_and_place_then_rm_frees_it(hub: Hub, hub_env: Path) -> None:
    assert run_pull(pull_args(no_profile=True))[0] == 0
    listing = models_text()
    row = next(line for line in listing.splitlines() if line.startswith(REPO))
    assert "256.6 kB" in row and str(snapshot(hub_env)) in row
    assert f"Hugging Face cache {hub_env}: 1 model, 256.6 kB" in listing

    out = io.StringIO()
    assert modelcli.run_rm(rm_args(REPO), out, io.StringIO()) == 0
    assert "the Hugging Face cache; removing it frees 256.6 kB" in out.getvalue()
    assert not (hub_env / "models--tiny--tiny-chat").exists()
    assert "No local models found" in models_text()


def test_rm_refuses_while_a_running_server_uses_the_model(hub: Hub, hub_env: Path, hermetic_home: Path) -> None:
    from tuichat import paths

    assert run_pull(pull_args(no_profile=True))[0] == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = ServerRecord(
            name="tiny",
            profile={"model": str(snapshot(hub_env))},
            pid=sleeper.pid,
            pgid=sleeper.pid,
            host="127.0.0.1",
            port=1,
            key_file=str(hermetic_home / "none.key"),
            log_path=str(hermetic_home / "tiny.log"),
            started_at=time.time(),
            lmdeploy_version=None,
            command=["lmdeploy"],
        )
        servers = paths.state_dir() / "servers"
        servers.mkdir(parents=True, exist_ok=True)
        (servers / "tiny.json").write_text(record.to_json())
        with pytest.raises(TuichatError, match=r"in use by the running server 'tiny' \(pid \d+\).*tuichat stop tiny"):
            modelcli.run_rm(rm_args(REPO), io.StringIO(), io.StringIO())
        assert snapshot(hub_env).is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_rm_removes_a_folder_under_a_root_and_refuses_without_yes_off_a_terminal(tmp_path: Path, hub_env: Path) -> None:
    root = tmp_path / "models"
    folder = root / "tiny-local"
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)

    with pytest.raises(TuichatError, match="add --yes"):
        modelcli.run_rm(rm_args("tiny-local", str(root), yes=False), io.StringIO(), io.StringIO())
    assert folder.is_dir()

    out = io.StringIO()
    assert modelcli.run_rm(rm_args("tiny-local", str(root)), out, io.StringIO()) == 0
    assert "frees 256.6 kB" in out.getvalue() and not folder.exists() and root.is_dir()


# ---------------------------------------------------------------- for the launcher's preflight


def test_is_cached_only_after_a_complete_pull(hub: Hub, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from tuichat.models.pull import is_cached

    assert not is_cached(REPO)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    assert run_pull(pull_args(), progress=StopDuringWeights(after=16 * 1024))[0] == 130
    assert not is_cached(REPO)  # stopped half-way: not a model lmdeploy could load
    assert run_pull(pull_args(no_profile=True))[0] == 0
    assert is_cached(REPO) and is_cached(REPO, "main") and is_cached(REPO, hubstandin.COMMIT)
    assert not is_cached(REPO, "v2") and not is_cached("tiny/other") and not is_cached("not a hub id")


def test_hub_reachable_follows_hf_endpoint_and_offline_mode(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from standin.harness import free_port

    from tuichat.models.pull import hub_reachable

    assert hub_reachable()
    assert not hub_reachable({"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"})
    assert not hub_reachable({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, timeout=2.0)
