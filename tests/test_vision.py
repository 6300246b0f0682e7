"""Image tokens of vision-language models: the predictor against the numbers lmdeploy 0.18 counted on the H200
(the device kit's tiny Qwen2-VL), the downscale that makes a large image fit the session, the stand-in counting the
same way, and what a reopened chat says about its images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from standin.harness import run_standin

from tuichat.chat.client import ChatClient, ChatError, Finish, Usage
from tuichat.chat.images import load_attachment, prepare_attachment, reopened_images_note
from tuichat.chat.sampling import Sampling
from tuichat.chat.store import Store
from tuichat.chat.turns import ChatSession, Turn
from tuichat.chat.vision import VisionSpec, plan_image, read_spec, session_sentence, smart_resize
from tuichat.errors import TuichatError

TEXT_PROMPT = 19  # "Describe this image." alone, as the real server counted it
SIZES = [(112, 112), (448, 448), (896, 896), (1344, 1344), (1344, 672)]
# prompt_tokens seen on the H200 for each size: the kit's default processor (max_pixels 448*448), and one made
# with max_pixels 1344*1344 (there the last three overflowed a 1024-token session, with these input lengths)
SEEN_DEFAULT = [37, 277, 277, 277, 263]
SEEN_BIG = [37, 277, 1045, 2325, 1173]
QWEN2_VL = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {"patch_size": 14, "spatial_merge_size": 2, "depth": 2},
}


def make_vlm(folder: Path, max_pixels: int | None, *, new_style: bool = False, config: Any = None) -> Path:
    """A model folder as the device kit's make_vlm.py leaves it: transformers 4 wrote preprocessor_config.json,
    transformers 5 (`new_style`) writes the image processor, its bounds as `size`, inside processor_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or QWEN2_VL))
    if max_pixels is not None:
        pre: dict[str, Any] = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2}
        if new_style:
            pre["size"] = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
            unified = {"image_processor": pre, "processor_class": "Qwen2VLProcessor"}
            (folder / "processor_config.json").write_text(json.dumps(unified))
        else:
            pre |= {"min_pixels": 56 * 56, "max_pixels": max_pixels}
            (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def picture(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), (200, 120, 40)).save(path)
    return path


# ---------------------------------------------------------------- the predictor


@pytest.mark.parametrize(("max_pixels", "seen"), [(448 * 448, SEEN_DEFAULT), (1344 * 1344, SEEN_BIG)])
def test_predicted_tokens_match_what_lmdeploy_counted(tmp_path: Path, max_pixels: int, seen: list[int]) -> None:
    spec = read_spec(make_vlm(tmp_path / "vlm", max_pixels))
    assert spec is not None and spec.predicts
    assert [TEXT_PROMPT + (spec.image_tokens(w, h) or 0) for w, h in SIZES] == seen


def test_processor_bounds_are_read_from_either_layout_and_default_as_transformers_does(tmp_path: Path) -> None:
    new = read_spec(make_vlm(tmp_path / "new", 1344 * 1344, new_style=True))
    bare = read_spec(make_vlm(tmp_path / "bare", None))  # no preprocessor_config.json at all
    assert new is not None and new.max_pixels == 1344 * 1344 and new.image_tokens(896, 896) == 1026
    assert bare is not None and (bare.min_pixels, bare.max_pixels, bare.factor) == (56 * 56, 28 * 28 * 1280, 28)


def test_smart_resize_rounds_grows_and_shrinks_like_the_processor() -> None:
    assert smart_resize(672, 1344, 28, 3136, 448 * 448) == (308, 616)  # 1344x672 on the default processor
    assert smart_resize(20, 20, 28, 3136, 448 * 448) == (56, 56)  # grown to min_pixels
    assert smart_resize(601, 601, 28, 3136, 10**7) == (588, 588)
    with pytest.raises(TuichatError, match="200 times"):
        smart_resize(10, 4000, 28, 3136, 10**7)


def test_other_architectures_are_vlm_with_an_unknown_count_and_text_models_are_not(tmp_path: Path) -> None:
    llava = read_spec(make_vlm(tmp_path / "llava", None, config={"architectures": ["LlavaForConditionalGeneration"]}))
    text = read_spec(make_vlm(tmp_path / "qwen", None, config={"architectures": ["Qwen2ForCausalLM"]}))
    assert llava is not None and llava.is_vlm and not llava.predicts and llava.image_tokens(448, 448) is None
    assert text is not None and not text.is_vlm
    assert read_spec(tmp_path / "nothing-here") is None


# ---------------------------------------------------------------- fitting the session


BIG = VisionSpec("Qwen2VLForConditionalGeneration", True, True, max_pixels=1344 * 1344)


def test_an_image_that_fits_is_sent_as_it_is() -> None:
    plan = plan_image(BIG, 448, 448, session_len=1024, used_tokens=19)
    assert (plan.width, plan.height, plan.tokens, plan.note) == (448, 448, 258, None)


def test_a_too_large_image_is_shrunk_to_the_largest_size_that_fits() -> None:
    plan = plan_image(BIG, 1344, 1344, name="photo.jpg", session_len=1024, used_tokens=0, reserve=256)
    budget = 1024 - 256 - 1
    assert plan.tokens is not None and plan.tokens <= budget
    assert (plan.width, plan.height) == (756, 756)
    assert (BIG.image_tokens(784, 784) or 0) > budget  # one cell larger would not fit: this is the largest
    assert plan.note == (
        "photo.jpg 1344x1344 would take ~2,306 tokens of the 1,024-token session (~767 left for it): "
        "sent at 756x756 (~731 tokens)."
    )


def test_the_shape_is_kept_and_what_the_chat_uses_is_taken_off() -> None:
    roomy = plan_image(BIG, 1344, 672, session_len=1024, used_tokens=0, reserve=0)
    tight = plan_image(BIG, 1344, 672, session_len=1024, used_tokens=600, reserve=0)
    # the shape within one 28-pixel cell, as the processor's own rounding would leave it
    assert abs(roomy.width - 2 * roomy.height) <= 28 and abs(tight.width - 2 * tight.height) <= 28
    assert tight.width < roomy.width
    assert (tight.tokens or 0) <= 1024 - 600 - 1 < (BIG.image_tokens(tight.width + 56, tight.height + 28) or 0)


def test_an_image_that_cannot_fit_at_any_size_says_what_to_do() -> None:
    with pytest.raises(TuichatError, match="Start a new chat"):
        plan_image(BIG, 1344, 1344, name="photo.jpg", session_len=1024, used_tokens=1000)


def test_without_a_known_rule_only_the_longest_side_applies_and_the_note_says_so() -> None:
    llava = VisionSpec("LlavaForConditionalGeneration", True, False)
    plan = plan_image(llava, 4000, 2000, max_side=1344, session_len=1024)
    assert (plan.width, plan.height, plan.tokens) == (1344, 672, None)
    assert plan.note is not None and "cannot predict" in plan.note
    assert plan_image(None, 4000, 2000, max_side=1344).note is None  # no folder known: as before


def test_attaching_a_large_image_sends_the_shrunk_jpeg_and_says_so(tmp_path: Path) -> None:
    folder = make_vlm(tmp_path / "vlm", 1344 * 1344)
    big = picture(tmp_path / "photo.png", 1344, 1344)
    prepared = prepare_attachment(big, 4096, model=folder, session_len=1024, used_tokens=19)
    att = prepared.attachment
    assert (att.width, att.height) == (756, 756)
    assert att.data_url.startswith("data:image/jpeg;base64,")
    assert prepared.tokens == 27 * 27 + 2
    assert prepared.note is not None and "sent at 756x756 (~731 tokens)" in prepared.note
    # a second image in the same message gets what the first one left: 1024 - 19 - 731 - 256 - 1 = 17 tokens
    second = prepare_attachment(big, 4096, model=folder, session_len=1024, used_tokens=19, pending=[att])
    assert (second.attachment.width, second.tokens) == (84, 3 * 3 + 2)


def test_attaching_to_a_text_only_model_warns_and_without_a_folder_nothing_changes(tmp_path: Path) -> None:
    text_model = make_vlm(tmp_path / "qwen", None, config={"architectures": ["Qwen2ForCausalLM"]})
    pic = picture(tmp_path / "cat.png", 2000, 1000)
    warned = prepare_attachment(pic, 1344, model=text_model, session_len=1024)
    assert warned.note is not None and "text-only" in warned.note
    plain = load_attachment(pic, 1344)
    assert (plain.width, plain.height) == (1344, 672)


def test_session_sentences_name_the_size_that_fits() -> None:
    default = VisionSpec("Qwen2VLForConditionalGeneration", True, True, max_pixels=448 * 448)
    assert session_sentence(default, 4096) == (
        "Images up to 448x448 (~258 tokens each) fit a 4,096-token session; the processor shrinks larger ones "
        "to that size, so about 14 fit in one chat."
    )
    assert session_sentence(BIG, 1024) == (
        "Images up to 756x756 (~731 tokens each) fit a 1,024-token session; tuichat shrinks larger ones before sending."
    )
    assert session_sentence(VisionSpec("Qwen2ForCausalLM", False, False), 4096) is None


# ---------------------------------------------------------------- the stand-in counts as the real server


async def ask(client: ChatClient, model: str, turn: Turn) -> int | str:
    """The prompt tokens the server counted for one user turn, or its error sentence."""
    prompt: int | str = "no usage"
    try:
        async for event in client.stream_chat(model, ChatSession([turn]).history(), Sampling(max_tokens=4)):
            if isinstance(event, Usage) and event.prompt_tokens is not None:
                prompt = event.prompt_tokens
            elif isinstance(event, Finish):
                pass
    except ChatError as exc:
        return exc.detail or exc.message
    return prompt


@pytest.mark.slow
@pytest.mark.parametrize("new_style", [False, True], ids=["transformers4-folder", "transformers5-folder"])
async def test_standin_and_predictor_agree_with_the_real_counts(tmp_path: Path, new_style: bool) -> None:
    folder = make_vlm(tmp_path / "vlm-big", 1344 * 1344, new_style=new_style)
    spec = read_spec(folder)
    assert spec is not None
    text = "Describe this image."
    with run_standin("--fake-load-seconds", "0.05", "--session-len", "1024", model=str(folder)) as s:
        client = ChatClient(s.url, "test-key")
        try:
            base = await ask(client, str(folder), Turn("user", text))
            assert isinstance(base, int)
            seen: list[int | str] = []
            for w, h in SIZES:
                att = load_attachment(picture(tmp_path / f"{w}x{h}.png", w, h), 4096)
                seen.append(await ask(client, str(folder), Turn("user", text, attachments=[att])))
            # tuichat's own path: the 1344x1344 image shrunk to fit, then accepted
            big = prepare_attachment(tmp_path / "1344x1344.png", 4096, model=folder, session_len=1024)
            fitted = await ask(client, str(folder), Turn("user", text, attachments=[big.attachment]))
        finally:
            await client.aclose()
    # The stand-in's text tokenizer is not the model's BPE, so what the images add is compared, on the real
    # server's text count: the input lengths are then the H200's own (37, 277, then 1045, 2325, 1173 refused).
    predicted = [TEXT_PROMPT + (spec.image_tokens(w, h) or 0) for w, h in SIZES]
    assert predicted == SEEN_BIG
    assert seen[:2] == [base - TEXT_PROMPT + n for n in SEEN_BIG[:2]]
    assert seen[2:] == [
        f"Input length ({base - TEXT_PROMPT + n}) must be smaller than the model context length (1024)."
        for n in SEEN_BIG[2:]
    ]
    assert isinstance(fitted, int) and fitted == base + (big.tokens or 0) and fitted < 1024


# ---------------------------------------------------------------- reopened chats


def test_a_reopened_chat_names_each_turns_images_and_says_they_are_not_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUICHAT_HOME", str(tmp_path))
    store = Store.open(tmp_path / "history.db")
    conv = store.create_conversation(model="tiny-vl")
    store.add_message(conv, "user", "what is this?", images=["cat.png", "dog.jpg"])
    store.add_message(conv, "assistant", "two animals")
    store.add_message(conv, "user", "and now?")
    rows = store.messages(conv)
    notes = [reopened_images_note(m.images) for m in rows]
    assert rows[0].images == ["cat.png", "dog.jpg"]
    assert notes[0] is not None and "cat.png, dog.jpg" in notes[0] and "/image" in notes[0]
    assert notes[1:] == [None, None]
