"""LLaVA-ϕ's own vision tower: a nano CLIP trained here contrastively on captions with hard negatives
(`vision_pretrain`).
"""

from __future__ import annotations

import random
from pathlib import Path

from slmkit.data.sft import SFTData
from slmkit.domains.llava_phi.scenes import _THING, COLOURS, SHAPES, read_conversations
from slmkit.methods.finetune import FinetuneArgs
from slmkit.train import RUNS_DIR


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
                    run: str = "llava-clip", runs_dir: Path = RUNS_DIR, resume: bool = False,
                    train_args: FinetuneArgs | None = None, hard_negatives: bool = True,
                    progress: bool = True) -> dict:
    """Train a nano CLIP (vision tower + small text tower) contrastively on the captions, for users without CLIP
    weights; then `slm llava assemble --vision RUNS_DIR/RUN/model`.

    Train the zoo's nano CLIP vision tower (with a small text tower and a BPE trained on the captions) with
    CLIP's contrastive objective on DATA/stage1.jsonl, for users without CLIP weights. The CLIP checkpoint is
    RUNS_DIR/RUN/model; give it to `slm llava assemble --vision`. `hard_negatives` (default) adds NegCLIP's
    hard negative captions to training (`hard_negative`), which teaches the tower to tell shapes apart (a
    linear shape probe 0.750 -> 0.795, README); the held-out loss stays plain CLIP's, comparable across runs.

    Args:
        data: Directory written by `slm llava data` (or a LLaVA-format JSONL file).
        image_size: Image side in pixels.
        vocab_size: BPE vocabulary of the caption tokenizer.
        hard_negatives: Also train against NegCLIP hard negatives: each caption with one thing's shape, colour or size
            changed.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from slmkit import zoo
    from slmkit.data.sft import split
    from slmkit.data.tokenizers import train_bpe
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


def report(s: dict, args: dict, out) -> None:
    """Print what `slm llava vision-pretrain` reports."""
    out.print(f"done: contrastive loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f}; CLIP in {s['run_dir']}/model")
