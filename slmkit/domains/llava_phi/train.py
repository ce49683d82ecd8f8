"""LLaVA-ϕ's two-stage training: the projector on captions, then projector and LM (or LoRA) on
conversations (`llava_train`).
"""

from __future__ import annotations

from pathlib import Path

from slmkit.data.sft import SFTData
from slmkit.domains.llava_phi.model import load_llava
from slmkit.domains.llava_phi.scenes import IMAGE_TOKEN, read_conversations
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs, sft_objective
from slmkit.train import RUNS_DIR


class LlavaData(SFTData):
    """Conversations with one image each, batched like SFTData: the `<image>` token is expanded to the
    tower's patch count; loss on assistant turns only."""

    def __init__(self, processor, rows: list[dict], seq_len: int, image_tokens: int):
        from slmkit.data.sft import chat_example

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
                train_vision: bool = False, run: str = "llava", runs_dir: Path = RUNS_DIR, resume: bool = False,
                train_args: FinetuneArgs | None = None, progress: bool = True) -> dict:
    """Train LLaVA-ϕ stage 1 or 2 (default learning rates 1e-3 and 2e-5); loss on answers only.

    Train a LLaVA-ϕ checkpoint (from `slm llava assemble`, or stage 1's output) on DATA (a directory from
    `slm llava data`, whose stageN.jsonl is used, or a LLaVA-format JSONL file). Stage 1 trains the projector
    on captions, stage 2 the projector and the language model (or LoRA adapters on it with `lora`) on
    visual instructions, and with `train_vision` the vision tower as well; the default learning rate is the
    stage's (1e-3, 2e-5). The model is RUNS_DIR/RUN/stageN/model.

    Args:
        model: A LLaVA-ϕ checkpoint (assembled, or stage 1's output).
        data: Directory written by `slm llava data` (or a LLaVA-format JSONL file).
        stage: 1: projector on captions; 2: projector + LM on instructions.
        lora: Stage 2 with LoRA adapters on the LM instead of full tuning.
        train_vision: Stage 2 also trains the vision tower (for a tower trained here on little data; LLaVA keeps a
            CLIP frozen).
    """
    from dataclasses import replace

    from slmkit.data.sft import split
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


def report(s: dict, args: dict, out) -> None:
    """Print what `slm llava train` reports."""
    out.print(f"done: held-out loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f}; model in "
              f"{s['run_dir']}/model")
