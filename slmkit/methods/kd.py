"""Knowledge distillation's building blocks (Hinton et al., 2015; TinyBERT's layer maps), shared by the
distillation workflow (`distill.py`), Length-Adaptive Distillation (`length_adaptive.py`), PET's final
classifier and the cut models of TinyGSM's verifier and LLaVA-ϕ:

- `soft_cross_entropy`: a student's distribution at temperature T against a teacher's soft targets;
- `kd_objective`: alpha * soft targets + (1 - alpha) * gold labels (classes, or next tokens for LMs)
  + hidden_weight * MSE of mapped hidden states + attention_weight * MSE of mapped head-averaged attention maps;
- `default_layer_map`, `layers_of`, `keep_layers`: which teacher layer each student layer imitates, and cutting
  a model down to some of its layers;
- `use_eager_attention`: attention maps (matched here, read by token pruning) come only from eager attention.
"""

from __future__ import annotations

import math

from slmkit.errors import SlmError


def soft_cross_entropy(student_logits, teacher_probs, temperature: float = 1.0):
    """Cross-entropy of the student's distribution at `temperature` against the teacher's probabilities
    (already computed at that temperature), scaled by T^2 so gradients keep their size as T changes."""
    import torch

    log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs * log_p).sum(-1).mean() * temperature ** 2


def layers_of(model):
    """The transformer block list of a BERT-family encoder or a decoder-only LM."""
    base = model.base_model
    blocks = getattr(getattr(base, "encoder", None), "layer", None)
    blocks = blocks if blocks is not None else getattr(base, "layers", None)
    if blocks is None:
        raise SlmError(f"{type(model).__name__}: cannot find its transformer layers")
    return blocks


def keep_layers(model, indices: list[int], option: str = "--student-layers"):
    """Cut a model down to the given layers (student initialisation from a deeper checkpoint; a cheaper
    language model for LLaVA-ϕ). OPTION names the flag that gave INDICES in the error."""
    import torch

    blocks = layers_of(model)
    if not indices or any(not 0 <= i < len(blocks) for i in indices) or len(set(indices)) != len(indices):
        raise SlmError(f"{option} must be distinct indices in 0..{len(blocks) - 1} (got {indices})")
    kept = torch.nn.ModuleList([blocks[i] for i in sorted(indices)])
    for new, block in enumerate(kept):  # decoder attention modules index the KV cache by layer
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
    parent = model.base_model.encoder if hasattr(model.base_model, "encoder") else model.base_model
    setattr(parent, "layer" if hasattr(parent, "layer") else "layers", kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in sorted(indices)]
    return model


def kd_objective(teacher, *, temperature: float, alpha: float, hidden_weight: float = 0.0,
                 attention_weight: float = 0.0, layer_map: list[int] | None = None, lm: bool = False):
    """Distillation loss for `slmkit.train.train`; batches are dicts (classification) or token ids (LM)."""
    import torch

    def objective(model, batch, generator):
        inputs = {"input_ids": batch} if lm else {k: batch[k] for k in ("input_ids", "attention_mask")}
        extra = {"output_hidden_states": hidden_weight > 0, "output_attentions": attention_weight > 0}
        with torch.no_grad():
            t = teacher(**inputs, **extra)
        s = model(**inputs, **extra)
        ids = inputs["input_ids"]
        mask = torch.ones(ids.shape, device=ids.device) if lm else inputs["attention_mask"].float()
        soft = torch.softmax(t.logits.float() / temperature, -1)
        if lm:  # every position predicts the next token
            gold = torch.nn.functional.cross_entropy(s.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            soft_loss = soft_cross_entropy(s.logits.flatten(0, 1), soft.flatten(0, 1), temperature)
        else:
            gold = torch.nn.functional.cross_entropy(s.logits.float(), batch["labels"])
            soft_loss = soft_cross_entropy(s.logits, soft, temperature)
        loss = alpha * soft_loss + (1 - alpha) * gold
        for i, j in enumerate(layer_map or []):
            if hidden_weight:
                diff = ((s.hidden_states[i + 1].float() - t.hidden_states[j + 1].float()) ** 2).mean(-1)
                loss = loss + hidden_weight * (diff * mask).sum() / mask.sum()
            if attention_weight:
                diff = (s.attentions[i].float().mean(1) - t.attentions[j].float().mean(1)) ** 2
                loss = loss + attention_weight * (diff.sum(-1) * mask).sum() / mask.sum()
        return loss, int(mask.sum()) if lm else len(ids)

    return objective


def use_eager_attention(model) -> None:
    """Pruning reads attention probabilities, which only the eager implementation returns."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (0-based) imitates teacher layer ceil((i + 1) * T / S) - 1: the last layers align."""
    return [math.ceil((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
