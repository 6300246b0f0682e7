"""AWQ calibration on local text: the quantize job's own entry, `python -m tuichat.models.calib_entry MODEL ...`.

lmdeploy 0.18 only calibrates on named sets that `datasets` downloads from a hub at run time, which fails on a
machine without internet. Its `lmdeploy/lite/apis/calibrate.py` imports `get_calib_loaders` at module level and
`torch.cat`s what it returns (a list of `[1, seqlen]` token tensors), so this entry, running in the job's own
process (and process group), cuts such samples from local text with the model's own tokenizer, puts a function
returning them in place of `lmdeploy.lite.apis.calibrate.get_calib_loaders`, and calls
`lmdeploy.lite.apis.auto_awq.auto_awq` with the arguments `lmdeploy lite auto_awq` would pass. Everything
lmdeploy prints stays as it is, so the job follows the same progress lines.

The samples are cut before lmdeploy loads the model, so too little text fails in seconds, not after the model
has been read. Windows never overlap: a sample repeated would only weigh the same tokens twice.

Only the standard library is imported at module level (lmdeploy, transformers and torch are imported inside
`main`), so the cutting and the argument building are plain functions a test runs without torch; the module
imports nothing of tuichat either, so it can also run by file path under another environment's Python.
A failure tuichat can explain is printed as one `tuichat calibration: SENTENCE` line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
# lmdeploy's calibrate() asserts a known set name although the replaced loader never reads it
PLACEHOLDER_DATASET = "wikitext2"
ERROR_PREFIX = "tuichat calibration: "
MAX_TEXT_CHARS = 200_000_000  # a folder bigger than this is read up to here: tokenizing more takes too long
_JSON_TEXT_KEYS = ("text", "content", "prompt", "response", "completion", "question", "answer", "output")


class CalibrationError(Exception):
    """A problem with the calibration text or options, as a sentence that says what to do."""


# ---------------------------------------------------------------- reading the text


def text_files(path: Path) -> list[Path]:
    """The calibration files: `path` itself, or the .txt/.md/.jsonl files under a folder (sorted, no hidden ones)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise CalibrationError(
                f"{path} is not a .txt, .md or .jsonl file: give a text file, or a folder of them, for calibration."
            )
        return [path]
    if not path.is_dir():
        raise CalibrationError(f"There is no calibration file or folder at {path}: check the path.")
    found = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise CalibrationError(
            f"The folder {path} holds no .txt, .md or .jsonl files: put calibration text there, or give a file."
        )
    return found


def _json_texts(value: object) -> Iterable[str]:
    """The text of one JSON line: a string, the usual text fields, or chat `messages`."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _json_texts(item)
    elif isinstance(value, dict):
        for key in _JSON_TEXT_KEYS:
            if isinstance(value.get(key), str):
                yield value[key]
        for key in ("messages", "conversations", "turns"):
            if isinstance(value.get(key), list):
                yield from _json_texts(value[key])
        if isinstance(value.get("value"), str):  # ShareGPT's {"from": ..., "value": ...}
            yield value["value"]


def jsonl_text(raw: str) -> str:
    """The texts of a JSON-lines file, one block per line; lines that are not JSON are skipped."""
    blocks: list[str] = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        blocks.extend(t for t in _json_texts(value) if t.strip())
    return "\n\n".join(blocks)


def read_text(path: Path, max_chars: int = MAX_TEXT_CHARS) -> str:
    """All calibration text under `path`, files joined by a blank line; raises CalibrationError when empty."""
    files = text_files(path)
    parts: list[str] = []
    total = 0
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CalibrationError(f"Cannot read the calibration file {file}: {exc.strerror or exc}.") from None
        text = jsonl_text(raw) if file.suffix.lower() == ".jsonl" else raw
        if text.strip():
            parts.append(text.strip())
            total += len(parts[-1])
        if total >= max_chars:
            break
    if not parts:
        raise CalibrationError(f"The calibration text at {path} is empty: give a file with text in it.")
    return "\n\n".join(parts)[:max_chars]


# ---------------------------------------------------------------- cutting samples


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's token ids as lmdeploy's own loaders make them (`tokenizer(text)`, special tokens as usual)."""
    encoded = tokenizer(text)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def too_little_text(tokens: int, nsamples: int, seqlen: int, what: str = "The calibration text") -> str:
    """The sentence for text that cannot give `nsamples` separate windows of `seqlen` tokens."""
    fits = tokens // seqlen
    if fits == 0:
        fix = f"give more text, or lower --calib-seqlen to {max(1, tokens)} or less"
    else:
        fix = f"give more text, or lower --calib-samples to {fits} (or --calib-seqlen)"
    return (
        f"{what} has {tokens} tokens, enough for {fits} samples of {seqlen} tokens, but {nsamples} were asked: "
        f"{fix}; --calib-samples 0 quantizes without calibration data, at some cost in quality."
    )


def cut_samples(ids: Sequence[int], nsamples: int, seqlen: int, seed: int = 0) -> list[list[int]]:
    """`nsamples` windows of `seqlen` tokens that never overlap, picked over the whole text (fixed `seed`)."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"Calibration needs at least one sample of one token (got {nsamples} x {seqlen}).")
    slots = len(ids) // seqlen
    if slots < nsamples:
        raise CalibrationError(too_little_text(len(ids), nsamples, seqlen))
    # a random offset into the slack keeps the windows from always starting at the text's first token
    rng = random.Random(seed)
    shift = rng.randint(0, len(ids) - slots * seqlen)
    chosen = sorted(rng.sample(range(slots), nsamples))
    return [list(ids[shift + k * seqlen : shift + (k + 1) * seqlen]) for k in chosen]


def torch_tensor(ids: Sequence[int]) -> Any:
    """One `[1, seqlen]` int64 tensor, as lmdeploy's loaders return them (the only place torch is touched)."""
    torch = importlib.import_module("torch")
    return torch.tensor([list(ids)], dtype=torch.long)


def make_loader(
    samples: Sequence[Sequence[int]], to_tensor: Callable[[Sequence[int]], Any] = torch_tensor
) -> Callable[..., list[Any]]:
    """A stand-in for lmdeploy's `get_calib_loaders(name, tokenizer, nsamples, seed, seqlen)` returning `samples`."""
    expected_seqlen = len(samples[0]) if samples else 0

    def get_calib_loaders(
        name: str, tokenizer: Any, nsamples: int = 128, seed: int = 0, seqlen: int = 2048
    ) -> list[Any]:
        if nsamples != len(samples) or seqlen != expected_seqlen:
            # calibrate() asks for what tuichat passed it; anything else means lmdeploy changed its call
            raise CalibrationError(
                f"lmdeploy asked for {nsamples} samples of {seqlen} tokens, but {len(samples)} of "
                f"{expected_seqlen} were prepared: this lmdeploy version calls its loader differently."
            )
        return [to_tensor(s) for s in samples]

    return get_calib_loaders


# ---------------------------------------------------------------- arguments


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tuichat.models.calib_entry",
        description="lmdeploy lite auto_awq, calibrated on local text instead of a downloaded set.",
    )
    p.add_argument("model")
    p.add_argument("--calib-file", required=True, type=Path, help="a .txt/.md/.jsonl file or a folder of them")
    p.add_argument("--work-dir", default="./work_dir")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--search-scale", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--w-sym", action="store_true")
    p.add_argument("--w-group-size", type=int, default=128)
    p.add_argument("--revision")
    p.add_argument("--download-dir")
    p.add_argument("--seed", type=int, default=0)
    return p


def auto_awq_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments `lmdeploy lite auto_awq` (0.18, cli/lite.py via convert_args) gives `auto_awq`."""
    return {
        "model": args.model,
        "revision": args.revision,
        "download_dir": args.download_dir,
        "work_dir": args.work_dir,
        "calib_dataset": PLACEHOLDER_DATASET,
        "calib_samples": args.calib_samples,
        "calib_seqlen": args.calib_seqlen,
        "batch_size": args.batch_size,
        "search_scale": args.search_scale,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "device": args.device,
        "w_bits": args.w_bits,
        "w_sym": args.w_sym,
        "w_group_size": args.w_group_size,
    }


def check_args(args: argparse.Namespace) -> None:
    if args.calib_samples < 1:
        raise CalibrationError("Local calibration needs --calib-samples of 1 or more (0 is the data-free mode).")
    if args.calib_seqlen < 1:
        raise CalibrationError(f"--calib-seqlen must be 1 or more (got {args.calib_seqlen}).")
    if args.batch_size < 1:
        raise CalibrationError(f"--batch-size must be 1 or more (got {args.batch_size}).")


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The model's tokenizer, loaded as lmdeploy's calibrate() loads it."""
    auto_tokenizer = importlib.import_module("transformers").AutoTokenizer
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.revision:
        kwargs["revision"] = args.revision
    return auto_tokenizer.from_pretrained(args.model, **kwargs)


def prepare(
    args: argparse.Namespace, tokenizer: Any, to_tensor: Callable[[Sequence[int]], Any] | None = None
) -> Callable[..., list[Any]]:
    """Read and tokenize the text, cut the samples and return the loader that hands them to lmdeploy."""
    check_args(args)
    text = read_text(args.calib_file)
    ids = token_ids(tokenizer, text)
    samples = cut_samples(ids, args.calib_samples, args.calib_seqlen, args.seed)
    say(
        f"Calibration on local text: {len(samples)} samples of {args.calib_seqlen} tokens from {len(ids)} tokens "
        f"({len(text)} characters) of {args.calib_file}"
    )
    return make_loader(samples, to_tensor or torch_tensor)


def install(loader: Callable[..., list[Any]]) -> Callable[..., Any]:
    """Put `loader` in place of lmdeploy's and return `auto_awq`."""
    calibrate_module = importlib.import_module("lmdeploy.lite.apis.calibrate")
    setattr(calibrate_module, "get_calib_loaders", loader)  # noqa: B010 - replacing a module global is the point
    auto_awq: Callable[..., Any] = importlib.import_module("lmdeploy.lite.apis.auto_awq").auto_awq
    return auto_awq


def say(line: str) -> None:
    """One line into the job's log (its stdout), at once: the job follows the log as it grows."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        loader = prepare(args, load_tokenizer(args))
        auto_awq = install(loader)
        auto_awq(**auto_awq_kwargs(args))
    except CalibrationError as exc:
        say(f"{ERROR_PREFIX}{exc}")
        return 2
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # run by path: tuichat's own module names must not shadow installed packages
    sys.exit(main())
