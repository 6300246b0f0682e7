"""A stand-in for `python -m lmdeploy lite auto_awq` (lmdeploy 0.18) for tests; standard library only.

Invoked as `[sys.executable, tests/fake_lite.py, "lite", "auto_awq", MODEL, ...]` with lmdeploy's own flags.
It prints what the real command printed on an H200 (tqdm weight loading with carriage returns, `Move X to CPU.`
per layer, `Loading calibrate dataset ...`, `model.layers.N, samples: S, max gpu memory: G GB` per layer,
`model.layers.N smooth weight done. ...`, `model.layers.N.mlp.up_proj weight packed.` per linear layer), keeps a
child "worker" process in its process group (it ignores SIGINT, as busy workers do), writes the work dir where
the real one does, and on success leaves an AWQ-looking model (config.json with quantization_config, a small
safetensors file, lmdeploy's calibration statistics).

Fault switches, accepted anywhere in argv (so a test can put them in the command prefix): --fake-layers N,
--fake-seconds S (the whole run), --fake-fail oom|download|nogpu, --fake-hang (stops after the first calibrated
layer until signalled, and then leaves its worker behind unless the whole group is stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

# lmdeploy 0.18's choices (cli/utils.py): 'ptb' is not among them
DATASETS = ["wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
WORKER = (
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(3600)\n"
)


def parse(argv: list[str]) -> argparse.Namespace:
    # The fault switches may come anywhere, so tests can put them in the command prefix before `lite`.
    fake = argparse.ArgumentParser(add_help=False)
    fake.add_argument("--fake-layers", type=int, default=0)
    fake.add_argument("--fake-seconds", type=float, default=0.3)
    fake.add_argument("--fake-fail", choices=["oom", "download", "nogpu"])
    fake.add_argument("--fake-hang", action="store_true")
    switches, rest = fake.parse_known_args(argv)

    top = argparse.ArgumentParser(prog="lmdeploy")
    commands = top.add_subparsers(dest="command")
    lite = commands.add_parser("lite").add_subparsers(dest="lite_command")
    p = lite.add_parser("auto_awq")
    p.add_argument("model")
    p.add_argument("--work-dir", default="./work_dir")
    p.add_argument("--calib-dataset", default="wikitext2", choices=DATASETS)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--w-group-size", type=int, default=128)
    args = top.parse_args(rest)
    if args.command != "lite" or args.lite_command != "auto_awq":
        top.error("this stand-in only knows `lite auto_awq`")
    for key, value in vars(switches).items():
        setattr(args, key, value)
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
    args = parse(argv)
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE)
    assert worker.stdout is not None
    worker.stdout.readline()  # it ignores SIGINT from here on, like a busy worker
    try:
        return run(args)
    finally:
        worker.terminate()
        worker.wait()


def run(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.exists():
        print(f"can't find model from local_path {args.model}, try to download from remote")
        if args.model.count("/") == 1 and not args.model.startswith((".", "/")):
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
                f"'namespace/repo_name': '{args.model}'. Use `repo_type` argument if needed."
            )
        return 1
    config = json.loads((model / "config.json").read_text())
    layers = args.fake_layers or int(config.get("num_hidden_layers", 4))
    step = args.fake_seconds / (3 * layers + 2)

    print("[transformers] `torch_dtype` is deprecated! Use `dtype` instead!", flush=True)
    for n in range(0, 52, 17):
        sys.stdout.write(f"\rLoading weights: {n * 100 // 51:3d}%|          | {n}/51 [00:00<?, ?it/s]")
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.fake_fail == "nogpu":
        if args.dtype == "float16":
            traceback_end("RuntimeError: No CUDA GPUs are available")
        else:
            traceback_end(
                "    assert torch.cuda.is_bf16_supported(), 'your device does not support bfloat16 please "
                "set --dtype float16'",
                "AssertionError: your device does not support bfloat16 please set --dtype float16",
            )
        return 1
    print("Move model.embed_tokens to GPU.")
    for i in range(layers):
        print(f"Move model.layers.{i} to CPU.")
    print("Move model.norm to GPU.\nMove model.rotary_emb to GPU.\nMove lm_head to CPU.", flush=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)  # lmdeploy makes the work dir once the model has loaded
    print("Loading calibrate dataset ...", flush=True)
    time.sleep(step)
    if args.fake_fail == "download":
        traceback_end(
            '  File "/site/datasets/load.py", line 1914, in dataset_module_factory',
            f"ConnectionError: Couldn't reach '{args.calib_dataset}' on the Hub (LocalEntryNotFoundError)",
        )
        return 1
    for i in range(layers):
        time.sleep(step)
        if args.fake_fail == "oom" and i == layers // 2:
            traceback_end(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 GiB. GPU 0 has a total "
                "capacity of 139.80 GiB of which 73.13 GiB is free."
            )
            return 1
        print(f"model.layers.{i}, samples: {args.calib_samples}, max gpu memory: 0.04 GB", flush=True)
        if args.fake_hang:
            (work / "inputs_stats.pth").write_bytes(b"partial")
            # On SIGINT leave at once without tidying up the worker: only a whole-group stop ends it.
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
            while True:
                signal.pause()
    (work / "inputs_stats.pth").write_bytes(b"stats")
    (work / "outputs_stats.pth").write_bytes(b"stats")
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
        "bits": args.w_bits,
        "group_size": args.w_group_size,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    (work / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(work / "model.safetensors", layers)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, work / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
