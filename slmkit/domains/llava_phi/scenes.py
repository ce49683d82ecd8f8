"""LLaVA-ϕ's data: drawn scenes with captions, conversations and typed test questions (`llava_data`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import SlmError

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
    """Draw scenes (shapes, colours, sizes, positions, counts, words) with captions (stage 1), question-answer
    conversations (stage 2) and typed held-out questions, in LLaVA's format.

    Write OUT/images/*.png and, in LLaVA's JSON-lines format, stage1.jsonl (caption conversations),
    stage2.jsonl (2 to `turns` question-answer turns per image) and test.jsonl (held-out images, one typed
    question each: {"image", "type", "question", "answer"}).

    Args:
        out: Output directory.
        count: Images to draw.
        seed: Seed: the same seed draws the same images.
        test_fraction: Fraction of images held out for evaluation.
        image_size: Image side in pixels.
        turns: At most this many question-answer turns per stage-2 conversation (more supervision per image).
    """
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
_THING = re.compile(r"(small|large) (\w+) (circle|square|triangle) (?:at|in) the ([a-z ]+?)(?=, | and |\.)")


def scene_of(text: str) -> list[Thing]:
    """The things a `caption` names, read back from it."""
    cells = {Thing("", "", r, c, False).where: (r, c) for r, c in GRID}
    return [Thing(shape, colour, *cells[where], size == "large") for size, colour, shape, where in _THING.findall(text)]


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


def report(r: dict, args: dict, out) -> None:
    """Print what `slm llava data` reports."""
    types = ", ".join(f"{k} {v}" for k, v in sorted(r["test_types"].items()))
    out.print(f"{r['images']} images: {r['stage1']} captions, {r['stage2']} conversations, {r['test']} held-out "
              f"questions ({types}) -> {r['out']}")
