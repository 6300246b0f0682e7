"""Local model discovery, model facts, the fit estimate and the profile a chosen model gets."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tuichat.errors import TuichatError
from tuichat.models.discovery import (
    discover,
    fit_estimate,
    image_fit_note,
    inspect_model,
    local_model_folder,
    looks_like_hub_id,
    profile_for,
    profile_notes,
)
from tuichat.server.profiles import parse_profile

QWEN_SMALL = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "torch_dtype": "bfloat16",
}

# InternLM2-chat-1.8B's published shape: about 1.89 B parameters
INTERNLM2_1_8B = {
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 92544,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real safetensors file (header + zero data); returns the parameter count it holds."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    params = 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * sizes[dtype]]}
        offset += count * sizes[dtype]
        params += count
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return params


def make_model(folder: Path, config: dict[str, object], weights: dict[str, tuple[str, list[int]]] | None = None) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    if weights is None:
        return 0
    return write_safetensors(folder / "model.safetensors", weights)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Caches inside tmp_path, so no test sees the machine's real caches."""
    home = tmp_path / "home"
    home.mkdir()
    values = {
        "HOME": str(home),
        "HF_HOME": str(tmp_path / "hf"),
        "MODELSCOPE_CACHE": str(tmp_path / "ms"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    return values


def test_a_plain_model_folder_under_a_root_is_listed_with_its_facts(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "models"
    params = make_model(
        root / "tiny-chat",
        QWEN_SMALL,
        {"model.embed_tokens.weight": ("BF16", [1024, 256]), "model.layers.0.mlp.up_proj.weight": ("BF16", [512, 256])},
    )

    result = discover([root])

    assert result.problems == []
    [model] = result.models
    assert model.name == "tiny-chat"
    assert model.architecture == "Qwen2ForCausalLM"
    assert model.params_estimate == params
    assert model.dtype == "bfloat16"
    assert model.quantization is None
    assert not model.is_vlm
    weights_size = (root / "tiny-chat" / "model.safetensors").stat().st_size
    assert model.weights_bytes == weights_size
    assert model.size_bytes > weights_size  # config and tokenizer count on disk, not as weights


def test_parameter_estimate_from_config_matches_a_known_model(tmp_path: Path, env: dict[str, str]) -> None:
    make_model(tmp_path / "internlm2-chat-1_8b", INTERNLM2_1_8B)  # no safetensors: estimate from the shape

    model = inspect_model(tmp_path / "internlm2-chat-1_8b")

    assert model.params_estimate is not None
    assert abs(model.params_estimate - 1.89e9) / 1.89e9 < 0.03
    assert model.params_text == "1.9B"


def test_hugging_face_cache_layout_with_blob_symlinks(tmp_path: Path, env: dict[str, str]) -> None:
    entry = Path(env["HF_HOME"]) / "hub" / "models--internlm--internlm2-chat-1_8b"
    blobs = entry / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "aaa").write_text(json.dumps(INTERNLM2_1_8B))
    (blobs / "bbb").write_bytes(b"w" * 5000)
    old = entry / "snapshots" / "0ld"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{ broken, but not the revision refs/main names")
    snap = entry / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(blobs / "aaa")
    (snap / "pytorch_model.bin").symlink_to(blobs / "bbb")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")

    result = discover([])

    assert result.problems == []
    [model] = result.models
    assert model.hub_id == "internlm/internlm2-chat-1_8b"
    assert model.name == "internlm/internlm2-chat-1_8b"
    assert model.path == snap
    assert model.weights_bytes == 5000  # the size of the blob, not of the link
    assert model.params_estimate is not None and model.params_estimate > 1e9


def test_hugging_face_cache_under_home_when_hf_home_is_unset(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HOME")
    snap = Path(env["HOME"]) / ".cache" / "huggingface" / "hub" / "models--org--name" / "snapshots" / "r1"
    make_model(snap, QWEN_SMALL)

    assert [m.hub_id for m in discover([]).models] == ["org/name"]
    assert discover([], include_caches=False).models == []


def test_modelscope_cache_both_layouts(tmp_path: Path, env: dict[str, str]) -> None:
    cache = Path(env["MODELSCOPE_CACHE"])
    make_model(cache / "Shanghai_AI_Laboratory" / "internlm2-chat-1___8b", QWEN_SMALL)
    make_model(cache / "models" / "Qwen" / "Qwen2-0.5B", QWEN_SMALL)

    names = sorted(m.hub_id or "" for m in discover([]).models)

    assert names == ["Qwen/Qwen2-0.5B", "Shanghai_AI_Laboratory/internlm2-chat-1.8b"]


def test_awq_and_gptq_folders_get_their_model_format(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "models"
    awq = {**QWEN_SMALL, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    gptq = {**QWEN_SMALL, "quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": 128}}
    make_model(root / "qwen-awq", awq, {"model.layers.0.mlp.up_proj.qweight": ("I32", [256, 64])})
    make_model(root / "qwen-gptq", gptq)

    by_name = {m.name: m for m in discover([root]).models}

    assert by_name["qwen-awq"].quantization == "awq"
    assert by_name["qwen-awq"].w_bits == 4
    assert by_name["qwen-awq"].params_estimate == 256 * 64 * 8  # eight 4-bit weights per packed int32
    assert by_name["qwen-gptq"].quant_text == "gptq w8"

    name, table = profile_for(by_name["qwen-awq"])
    assert name == "qwen-awq"
    assert table["model_format"] == "awq"
    assert table["cache_max_entry_count"] == 0.4
    parse_profile(name, table, "config.toml")  # the table is one the profile validator accepts
    _, gptq_table = profile_for(by_name["qwen-gptq"])
    assert gptq_table["model_format"] == "gptq"


def test_lmdeploys_own_awq_output_is_recognised(tmp_path: Path, env: dict[str, str]) -> None:
    folder = tmp_path / "internlm2-w4"
    awq = {**QWEN_SMALL, "quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemm"}}
    make_model(folder, awq)
    (folder / "inputs_stats.pth").write_bytes(b"x" * 100)

    model = inspect_model(folder)

    assert model.quantization == "lmdeploy-awq"
    assert model.model_format == "awq"
    assert model.weights_bytes == 0  # calibration statistics are not weights


def test_vision_language_models_are_marked_and_get_a_note(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "models"
    llava = {
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {**QWEN_SMALL, "architectures": None},
        "vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128},
    }
    custom = {**QWEN_SMALL, "architectures": ["SomethingNewForCausalLM"], "vision_config": {"hidden_size": 64}}
    make_model(root / "llava-tiny", llava)
    make_model(root / "custom-vl", custom)
    make_model(root / "text-only", QWEN_SMALL)

    by_name = {m.name: m for m in discover([root]).models}

    assert by_name["llava-tiny"].is_vlm
    assert by_name["llava-tiny"].dtype == "bfloat16"  # read from the nested text config
    assert by_name["custom-vl"].is_vlm
    assert not by_name["text-only"].is_vlm
    name, table = profile_for(by_name["llava-tiny"])
    parse_profile(name, table, "config.toml")
    assert int(str(table["session_len"])) >= 8192
    assert any("images" in note for note in profile_notes(by_name["llava-tiny"]))
    assert profile_notes(by_name["text-only"]) == []


def test_a_broken_config_is_reported_and_the_rest_still_listed(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "models"
    make_model(root / "good", QWEN_SMALL)
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "config.json").write_text('{"architectures": ["X"],')
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "config.json").write_text('{"name": "some tool settings"}')

    result = discover([root])

    assert [m.name for m in result.models] == ["good"]
    assert len(result.problems) == 2
    bad = next(p for p in result.problems if "bad" in p)
    assert str(root / "bad" / "config.json") in bad
    assert "not valid JSON" in bad
    with pytest.raises(TuichatError, match="not valid JSON"):
        inspect_model(root / "bad")


def test_a_symlinked_model_folder_works_and_is_listed_once(tmp_path: Path, env: dict[str, str]) -> None:
    store = tmp_path / "share" / "internlm2-chat-1_8b"
    make_model(store, QWEN_SMALL, {"w": ("BF16", [64, 64])})
    root = tmp_path / "models"
    root.mkdir()
    (root / "internlm2-chat-1_8b").symlink_to(store, target_is_directory=True)  # as the tutorial did

    result = discover([root, tmp_path / "share"])

    [model] = result.models
    assert model.path == root / "internlm2-chat-1_8b"  # the link as found, not its target
    assert model.weights_bytes == (store / "model.safetensors").stat().st_size
    _, table = profile_for(model)
    assert table["model"] == str(root / "internlm2-chat-1_8b")


def test_org_slash_model_folders_under_a_root(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "models"
    make_model(root / "internlm" / "internlm2-chat-7b", QWEN_SMALL)

    assert [m.name for m in discover([root]).models] == ["internlm2-chat-7b"]


def test_a_folder_without_config_is_refused_with_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(TuichatError, match=r"has no config\.json"):
        inspect_model(tmp_path / "empty")


def test_hub_ids_and_paths_are_told_apart() -> None:
    assert looks_like_hub_id("internlm/internlm2-chat-1_8b")
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not looks_like_hub_id("/data/models/x")
    assert not looks_like_hub_id("./models/x")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("../x")
    assert not looks_like_hub_id("gpt2")


def test_profile_for_a_typed_hub_id_and_a_typo(tmp_path: Path) -> None:
    name, table = profile_for("internlm/internlm2-chat-1_8b")
    assert name == "internlm2-chat-1_8b"
    assert table == {"model": "internlm/internlm2-chat-1_8b"}
    assert profile_for("internlm/internlm2-chat-1_8b", "mine")[0] == "mine"

    with pytest.raises(TuichatError, match="neither a model folder nor a hub id"):
        profile_for(str(tmp_path / "no" / "such" / "model"))


def test_fit_estimate_in_plain_words() -> None:
    est = fit_estimate(3_600_000_000, 103_600_000_000, 143_000_000_000, 0.4)

    assert est.fits
    assert est.kv_bytes == 40_000_000_000
    assert est.sentence.startswith("weights 3.6 GB, KV cache gets about 40.0 GB at 0.4")
    assert "left free after the weights" in est.sentence  # lmdeploy's share is of the memory after weights
    assert est.sentence.endswith("fits.")


def test_fit_estimate_when_the_gpu_is_too_small_or_busy() -> None:
    too_big = fit_estimate(30_000_000_000, 24_000_000_000, 24_000_000_000, 0.8)
    assert not too_big.fits
    assert "does not fit" in too_big.sentence
    assert "AWQ" in too_big.sentence

    busy = fit_estimate(14_000_000_000, 10_000_000_000, 80_000_000_000, 0.8)
    assert not busy.fits
    assert "only 10.0 GB of GPU memory is free" in busy.sentence
    assert "already in use" in busy.sentence


def test_fit_estimate_with_tensor_parallel_counts_per_gpu() -> None:
    est = fit_estimate(140_000_000_000, 80_000_000_000, 80_000_000_000, 0.5, tp=2)

    assert est.fits
    assert "70.0 GB on each of 2 GPUs" in est.sentence
    assert est.kv_bytes == 5_000_000_000
    assert "per GPU" in est.sentence


def test_fit_estimate_refuses_a_share_outside_zero_to_one() -> None:
    with pytest.raises(TuichatError, match="at most 1"):
        fit_estimate(1, 2, 3, 1.5)


QWEN2_VL = {
    **QWEN_SMALL,
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {"patch_size": 14, "spatial_merge_size": 2, "depth": 2, "embed_dim": 128},
}


def make_qwen2_vl(folder: Path, max_pixels: int) -> Path:
    make_model(folder, QWEN2_VL)
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": max_pixels}
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "patch_size": 14, "merge_size": 2}))
    return folder


def test_a_qwen2_vl_profile_says_which_image_size_fits_its_session(tmp_path: Path, env: dict[str, str]) -> None:
    model = inspect_model(make_qwen2_vl(tmp_path / "tiny-vl", 448 * 448))
    _, table = profile_for(model)
    notes = profile_notes(model)

    assert model.is_vlm
    assert table["session_len"] == 16384
    assert any(
        "Images up to 448x448 (~258 tokens each) fit a 16,384-token session" in note and "about 62" in note
        for note in notes
    )
    assert image_fit_note(model.path, 4096) == (
        "Images up to 448x448 (~258 tokens each) fit a 4,096-token session; the processor shrinks larger ones to "
        "that size, so about 14 fit in one chat."
    )


def test_a_short_session_names_the_largest_image_and_text_models_get_no_image_note(
    tmp_path: Path, env: dict[str, str]
) -> None:
    big = make_qwen2_vl(tmp_path / "tiny-vl-big", 1344 * 1344)
    make_model(tmp_path / "text-only", QWEN_SMALL)

    assert image_fit_note(big, 1024) == (
        "Images up to 756x756 (~731 tokens each) fit a 1,024-token session; tuichat shrinks larger ones before sending."
    )
    assert image_fit_note(tmp_path / "text-only", 1024) is None
    assert image_fit_note("org/not-downloaded", 1024) is None


def test_a_hub_id_finds_its_downloaded_snapshot(tmp_path: Path, env: dict[str, str]) -> None:
    snap = Path(env["HF_HOME"]) / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "r1"
    make_qwen2_vl(snap, 28 * 28 * 1280)

    assert local_model_folder("Qwen/Qwen2-VL-2B-Instruct") == snap
    assert local_model_folder(str(snap)) == snap
    assert local_model_folder("Qwen/Qwen2-VL-7B-Instruct") is None
    assert image_fit_note("Qwen/Qwen2-VL-2B-Instruct", 16384) is not None
