"""A stand-in for lmdeploy 0.18's AWQ quantizer for tests; standard library only.

Two ways in, as with the real thing:
- `[sys.executable, tests/fake_lite.py, "lite", "auto_awq", MODEL, ...]` with lmdeploy's own CLI flags (a named
  calibration set, or `--calib-samples 0` for data-free), and `python -m lmdeploy lite auto_awq ...` once
  `make_site(DIR)` has been put on PYTHONPATH;
- `make_site(DIR)` also writes the modules tuichat's calibration entry imports: `lmdeploy.lite.apis.calibrate`
  (with `get_calib_loaders`, which the entry replaces, and `calibrate`, which calls it through the module as
  lmdeploy does), `lmdeploy.lite.apis.auto_awq.auto_awq` (lmdeploy's signature), a `torch` with just
  `tensor`/`long`/`cat`, and a `transformers.AutoTokenizer` whose tokens are UTF-8 bytes.

It prints what the real command printed on an H200 (tqdm weight loading with carriage returns, `Move X to CPU.`
per layer, `Loading calibrate dataset ...`, `model.layers.N, samples: S, max gpu memory: G GB` per layer,
`model.layers.N smooth weight done. ...`, `model.layers.N.mlp.up_proj weight packed.` per linear layer); data-free
runs skip calibration as the real one does. It keeps a child "worker" process in its process group (it ignores
SIGINT, as busy workers do), writes the work dir where the real one does, and on success leaves an AWQ-looking
model (config.json with quantization_config, a small safetensors file and, after calibration,
`inputs_stats.pth` holding, as JSON, what it was calibrated on: the loader, sample count, length, first text).

The named-set loader plays the hub: it "downloads" unless told otherwise. Fault switches, anywhere in argv (so a
test can put them in the command prefix) or in $FAKE_LITE: --fake-layers N, --fake-seconds S (the whole run),
--fake-fail oom|download|nogpu, --fake-no-datasets (the named-set loader cannot import `datasets`),
--fake-hang (stops after the first calibrated layer until signalled, and then leaves its worker behind unless
the whole group is stopped).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# lmdeploy 0.18's choices (cli/utils.py): 'ptb' is not among them
DATASETS = ["wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext"]
LAYER_TYPE_MAP = {"Qwen2ForCausalLM": "Qwen2DecoderLayer", "LlamaForCausalLM": "LlamaDecoderLayer"}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
WORKER = (
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(3600)\n"
)
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- the modules the entry imports


class Tensor:
    """Just enough of a torch tensor for calibrate(): rows of ints, a shape, .to()."""

    def __init__(self, rows: list[list[int]], dtype: str) -> None:
        self.rows = rows
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), len(self.rows[0]) if self.rows else 0)

    def to(self, device: str) -> Tensor:
        return self


long = "int64"


def tensor(data: list[list[int]], dtype: str | None = None) -> Tensor:
    if not (isinstance(data, list) and all(isinstance(r, list) for r in data)):
        raise TypeError("the stand-in torch.tensor takes a list of rows")
    return Tensor([list(r) for r in data], dtype or "float32")


def cat(tensors: Sequence[Tensor]) -> Tensor:
    """torch.cat along dim 0: every piece a Tensor with the same row length."""
    if not tensors:
        raise RuntimeError("torch.cat(): expected a non-empty list of Tensors")
    width = tensors[0].shape[1]
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"expected Tensor as element in argument 0, but got {type(t).__name__}")
        if t.shape[1] != width:
            raise RuntimeError(f"Sizes of tensors must match except in dimension 0. Expected size {width}")
    return Tensor([row for t in tensors for row in t.rows], tensors[0].dtype)


class ByteTokenizer:
    """A tokenizer whose tokens are the text's UTF-8 bytes; loads from any model folder."""

    def __init__(self, trust_remote_code: bool) -> None:
        self.trust_remote_code = trust_remote_code

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path: str, trust_remote_code: bool = False, **kwargs: Any) -> ByteTokenizer:
        if not (Path(path) / "config.json").exists():
            raise OSError(f"Can't load tokenizer for '{path}'.")
        return ByteTokenizer(trust_remote_code)


def make_site(folder: Path) -> Path:
    """Write fake `lmdeploy`, `torch` and `transformers` packages into `folder` (for PYTHONPATH); returns it."""
    head = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport fake_lite\n"
    files = {
        "lmdeploy/__init__.py": "__version__ = '0.18.0'\n",
        "lmdeploy/__main__.py": head + "sys.exit(fake_lite.main(sys.argv[1:]))\n",
        "lmdeploy/lite/__init__.py": "",
        "lmdeploy/lite/apis/__init__.py": "",
        "lmdeploy/lite/apis/calibrate.py": head
        + "LAYER_TYPE_MAP = fake_lite.LAYER_TYPE_MAP\n"
        + "get_calib_loaders = fake_lite.get_calib_loaders\n\n\n"
        + "def calibrate(*args, **kwargs):\n    return fake_lite.calibrate(sys.modules[__name__], *args, **kwargs)\n",
        "lmdeploy/lite/apis/auto_awq.py": head + "auto_awq = fake_lite.auto_awq\n",
        "torch/__init__.py": head + "from fake_lite import Tensor, cat, long, tensor  # noqa: F401\n",
        "transformers/__init__.py": head + "from fake_lite import AutoTokenizer  # noqa: F401\n",
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


# ---------------------------------------------------------------- switches and the CLI


def switches(argv: Sequence[str] = ()) -> argparse.Namespace:
    fake = argparse.ArgumentParser(add_help=False)
    fake.add_argument("--fake-layers", type=int, default=0)
    fake.add_argument("--fake-seconds", type=float, default=0.3)
    fake.add_argument("--fake-fail", choices=["oom", "download", "nogpu"])
    fake.add_argument("--fake-no-datasets", action="store_true")
    fake.add_argument("--fake-hang", action="store_true")
    found, _ = fake.parse_known_args([*shlex.split(os.environ.get("FAKE_LITE", "")), *argv])
    return found


def parse(argv: list[str]) -> argparse.Namespace:
    # The fault switches may come anywhere, so tests can put them in the command prefix before `lite`.
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--fake-layers", "--fake-seconds", "--fake-fail"):
            skip = True  # its value follows
        elif not arg.startswith("--fake-"):
            rest.append(arg)
    top = argparse.ArgumentParser(prog="lmdeploy")
    commands = top.add_subparsers(dest="command")
    lite = commands.add_parser("lite").add_subparsers(dest="lite_command")
    p = lite.add_parser("auto_awq")
    p.add_argument("model")
    p.add_argument("--revision")
    p.add_argument("--download-dir")
    p.add_argument("--work-dir", default="./work_dir")
    p.add_argument("--calib-dataset", default="wikitext2", choices=DATASETS)
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
    args = top.parse_args(rest)
    if args.command != "lite" or args.lite_command != "auto_awq":
        top.error("this stand-in only knows `lite auto_awq`")
    return args


def traceback_end(*lines: str) -> None:
    print("Traceback (most recent call last):")
    print('  File "/site/lmdeploy/cli/entrypoint.py", line 39, in run')
    print("    args.run(args)")
    for line in lines:
        print(line)
    sys.stdout.flush()


def write_safetensors(path: Path, layers: int) -> None:
    header: dict[str, object] = {}
    offset = 0
    for i in range(layers):
        for linear in LINEARS:
            for part, dtype, shape in (("qweight", "I32", [16, 2]), ("scales", "F16", [1, 16])):
                size = (4 if dtype == "I32" else 2) * shape[0] * shape[1]
                header[f"model.layers.{i}.{linear}.{part}"] = {
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
    raw = json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.write(b"\0" * offset)


def main(argv: list[str]) -> int:
    """`lmdeploy lite auto_awq ...`: lmdeploy's CLI passes every flag on to auto_awq (convert_args)."""
    fake = switches(argv)
    kwargs = {k: v for k, v in vars(parse(argv)).items() if k not in ("command", "lite_command")}
    try:
        auto_awq(**kwargs, _switches=fake)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ---------------------------------------------------------------- lmdeploy's API


def get_calib_loaders(name: str, tokenizer: Any, nsamples: int = 128, seed: int = 0, seqlen: int = 2048) -> list[Any]:
    """The named-set loader: 'downloads' from the hub, as lmdeploy's does through `datasets`."""
    fake = switches(sys.argv)
    if fake.fake_no_datasets:
        raise ModuleNotFoundError("No module named 'datasets'")
    if fake.fake_fail == "download":
        traceback_end(
            '  File "/site/datasets/load.py", line 1914, in dataset_module_factory',
            f"ConnectionError: Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)",
        )
        raise SystemExit(1)
    torch = _torch()
    return [torch.tensor([[(i + k) % 256 for k in range(seqlen)]], dtype=torch.long) for i in range(nsamples)]


def _torch() -> ModuleType:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return sys.modules[__name__]


def _calibrate_module() -> ModuleType:
    try:
        return importlib.import_module("lmdeploy.lite.apis.calibrate")
    except ImportError:
        return sys.modules[__name__]


def calibrate(
    module: ModuleType,
    model: str,
    calib_dataset: str,
    calib_samples: int,
    calib_seqlen: int,
    work_dir: str,
    device: str,
    tokenizer: ByteTokenizer,
    layers: int,
    step: float,
    fake: argparse.Namespace,
) -> None:
    """lmdeploy's calibrate(): layers to CPU, the loader through its module, one line per calibrated layer."""
    assert calib_dataset in DATASETS, "Support only `wikitext2`, `c4`, `pileval`, ..."
    print("Move model.embed_tokens to GPU.")
    for i in range(layers):
        print(f"Move model.layers.{i} to CPU.")
    print("Move model.norm to GPU.\nMove model.rotary_emb to GPU.\nMove lm_head to CPU.", flush=True)
    print("Loading calibrate dataset ...", flush=True)
    loader = module.get_calib_loaders
    loaders = loader(calib_dataset, tokenizer, nsamples=calib_samples, seqlen=calib_seqlen)
    data = cat(loaders).to(device)
    if data.shape != (calib_samples, calib_seqlen):
        raise RuntimeError(f"calibration data has shape {data.shape}, not ({calib_samples}, {calib_seqlen})")
    time.sleep(step)
    work = Path(work_dir)
    for i in range(layers):
        time.sleep(step)
        if fake.fake_fail == "oom" and i == layers // 2:
            traceback_end(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 GiB. GPU 0 has a total "
                "capacity of 139.80 GiB of which 73.13 GiB is free."
            )
            raise SystemExit(1)
        print(f"model.layers.{i}, samples: {calib_samples}, max gpu memory: 0.04 GB", flush=True)
        if fake.fake_hang:
            (work / "inputs_stats.pth").write_bytes(b"partial")
            # On SIGINT leave at once without tidying up the worker: only a whole-group stop ends it.
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
            while True:
                signal.pause()
    record = {
        "loader": f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__name__', '?')}",
        "samples": data.shape[0],
        "seqlen": data.shape[1],
        "dtype": data.dtype,
        "first": tokenizer.decode(data.rows[0]),
        "trust_remote_code": tokenizer.trust_remote_code,
    }
    (work / "inputs_stats.pth").write_text(json.dumps(record))
    (work / "outputs_stats.pth").write_bytes(b"stats")


def auto_awq(
    model: str,
    work_dir: str = "./work_dir",
    calib_dataset: str = "wikitext2",
    calib_samples: int = 128,
    batch_size: int = 1,
    calib_seqlen: int = 2048,
    w_bits: int = 4,
    w_sym: bool = False,
    w_group_size: int = 128,
    search_scale: bool = False,
    device: str = "cuda",
    revision: str | None = None,
    dtype: str = "auto",
    download_dir: str | None = None,
    trust_remote_code: bool = False,
    *,
    _switches: argparse.Namespace | None = None,
) -> None:
    """lmdeploy 0.18's `lmdeploy.lite.apis.auto_awq.auto_awq`, same parameters."""
    fake = _switches or switches()
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE)
    assert worker.stdout is not None
    worker.stdout.readline()  # it ignores SIGINT from here on, like a busy worker
    try:
        _auto_awq(
            model,
            work_dir,
            calib_dataset,
            calib_samples,
            calib_seqlen,
            w_bits,
            w_group_size,
            dtype,
            device,
            trust_remote_code,
            fake,
        )
    finally:
        worker.terminate()
        worker.wait()


def _auto_awq(
    model_arg: str,
    work_dir: str,
    calib_dataset: str,
    calib_samples: int,
    calib_seqlen: int,
    w_bits: int,
    w_group_size: int,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    fake: argparse.Namespace,
) -> None:
    model = Path(model_arg)
    if not model.exists():
        print(f"can't find model from local_path {model_arg}, try to download from remote")
        if model_arg.count("/") == 1 and not model_arg.startswith((".", "/")):
            traceback_end(
                "httpx.ConnectError: [Errno -3] Temporary failure in name resolution",
                "huggingface_hub.errors.LocalEntryNotFoundError: Got: ConnectError: [Errno -3] Temporary "
                "failure in name resolution",
                "An error happened while trying to locate the files on the Hub, and we cannot find the "
                "appropriate snapshot folder for the specified revision on the local disk. Please check your "
                "internet connection and try again.",
            )
        else:
            traceback_end(
                "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
                f"'namespace/repo_name': '{model_arg}'. Use `repo_type` argument if needed."
            )
        raise SystemExit(1)
    config = json.loads((model / "config.json").read_text())
    layers = fake.fake_layers or int(config.get("num_hidden_layers", 4))
    step = fake.fake_seconds / (3 * layers + 2)

    print("[transformers] `torch_dtype` is deprecated! Use `dtype` instead!", flush=True)
    for n in range(0, 52, 17):
        sys.stdout.write(f"\rLoading weights: {n * 100 // 51:3d}%|          | {n}/51 [00:00<?, ?it/s]")
        sys.stdout.flush()
    sys.stdout.write("\n")
    if fake.fake_fail == "nogpu":
        if dtype == "float16":
            traceback_end("RuntimeError: No CUDA GPUs are available")
        else:
            traceback_end(
                "    assert torch.cuda.is_bf16_supported(), 'your device does not support bfloat16 please "
                "set --dtype float16'",
                "AssertionError: your device does not support bfloat16 please set --dtype float16",
            )
        raise SystemExit(1)
    tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)  # lmdeploy makes the work dir once the model has loaded
    if calib_samples:
        calibrate(
            _calibrate_module(),
            str(model),
            calib_dataset,
            calib_samples,
            calib_seqlen,
            work_dir,
            device,
            tokenizer,
            layers,
            step,
            fake,
        )
        for i in range(layers):
            time.sleep(step)
            print(f"model.layers.{i} smooth weight done. max gpu memory: 0.05 GB", flush=True)
    for i in range(layers):
        time.sleep(step)
        for linear in LINEARS:
            print(f"model.layers.{i}.{linear} weight packed.")
        sys.stdout.flush()
    sys.stdout.write("\rWriting model shards:   0%|          | 0/1 [00:00<?, ?it/s]")
    sys.stdout.write("\rWriting model shards: 100%|##########| 1/1 [00:00<00:00, 202.03it/s]\n")
    sys.stdout.flush()
    config["quantization_config"] = {
        "bits": w_bits,
        "group_size": w_group_size,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    (work / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(work / "model.safetensors", layers)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, work / name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
