"""LLaVA-ϕ: a small vision-language assistant (Zhu et al., 2024, after LLaVA-1.5).

A CLIP ViT vision tower (patch features of its penultimate layer, CLS dropped) feeds a 2-layer GELU MLP
projector whose outputs are spliced into a small causal LM at the `<image>` placeholder. The model is a
standard `transformers` `LlavaForConditionalGeneration` with a `LlavaProcessor` (CLIP's PIL image processor:
torchvision is not needed), so any tool that opens LLaVA checkpoints opens it.

- `draw_scene` / `llava_data`: procedurally drawn images (shapes, colours, sizes, positions on a 3x3 grid,
  counts, a rendered word) with captions for stage 1 and question-answer conversations for stage 2, plus a
  held-out set of typed questions; deterministic from a seed, written in LLaVA's JSON format.
- `assemble`: a vision tower (a CLIP checkpoint, or the zoo's nano tower) + any causal LM (the embedded
  SmolLM2, a Phi spec, a nano model) + a new projector, saved as one checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError

IMAGE_TOKEN = "<image>"
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ["circle", "square", "triangle"]
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]
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
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 4))
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
               progress: bool = True) -> dict:
    """Write OUT/images/*.png and, in LLaVA's JSON-lines format, stage1.jsonl (caption conversations),
    stage2.jsonl (2-4 question-answer turns per image) and test.jsonl (held-out images, one typed question
    each: {"image", "type", "question", "answer"})."""
    from rich.progress import Progress

    from slmkit.train import write_atomic

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
                turns = rng.sample(qa, min(len(qa), rng.randint(2, 4)))
                conversation = []
                for k, q in enumerate(turns):
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


def vision_tower(source: str | None, image_size: int | None = None):
    """A CLIP vision tower: a CLIP checkpoint directory (CLIPModel or CLIPVisionModel), or None for the zoo's
    nano tower (random; train it before relying on its features)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from slmkit import zoo

    if source is None:
        config = dict(zoo.get("llava-phi-nano").sub_configs["vision_config"][1])
        if image_size:
            config["image_size"] = image_size
        torch.manual_seed(0)
        return CLIPVisionModel(CLIPVisionConfig(**config))
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise SlmError(f"vision tower {source}: not a CLIP checkpoint directory (no config.json)")
    try:
        return CLIPVisionModel.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # a config of another model type, missing weights...
        raise SlmError(f"vision tower {source}: cannot load a CLIP vision model ({str(e).splitlines()[0]})") from e


def assemble(out: Path, lm: str | None = None, vision: str | None = None, image_size: int | None = None) -> Path:
    """Build a LLaVA-ϕ checkpoint in OUT: VISION's tower (penultimate-layer patches, CLS dropped), a new 2-layer
    GELU projector, LM (any causal LM; default the embedded model) with an added `<image>` token, and a
    LlavaProcessor whose image processor resizes and normalises like CLIP."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from slmkit.models import load, save_pretrained_atomic

    tower = vision_tower(vision, image_size)
    loaded = load(lm, dtype="fp32")
    if loaded.task != "causal-lm" or loaded.tokenizer is None:
        raise SlmError(f"{loaded.name} is not a causal LM with a tokenizer; LLaVA-ϕ needs one as its language model")
    tok = loaded.tokenizer
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = loaded.model
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    vc = tower.config
    patches = (vc.image_size // vc.patch_size) ** 2
    tied = bool(getattr(text.config, "tie_word_embeddings", False))
    config = LlavaConfig(vision_config=vc.to_dict(), text_config=text.config.to_dict(),
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=patches,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    if tied:
        model.tie_weights()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                                              crop_size={"height": vc.image_size, "width": vc.image_size}),
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
