import pytest
import torch

from slmkit.errors import SlmError
from slmkit.generate import (
    SamplingParams,
    _TextTracker,
    decode_tokens,
    encode,
    format_prompt,
    generate,
    next_tokens,
    stream,
)
from slmkit.models import Loaded

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away, there lived", "Hi"]


def _ours(loaded, prompts, n):
    ids, mask, _ = encode(loaded.tokenizer, prompts, None, n, loaded.model.config.is_encoder_decoder)
    steps = list(decode_tokens(loaded.model, ids, mask, SamplingParams(max_new_tokens=n), eos=set()))
    return torch.stack(steps, dim=1), ids, mask


@pytest.mark.parametrize("fixture", ["tiny_causal", "tiny_seq2seq"])
def test_greedy_batch_matches_hf_generate(fixture, request):
    loaded = request.getfixturevalue(fixture)
    ours, ids, mask = _ours(loaded, PROMPTS, 12)
    hf = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                               do_sample=False, eos_token_id=None, pad_token_id=loaded.tokenizer.pad_token_id)
    if not loaded.model.config.is_encoder_decoder:
        hf = hf[:, ids.shape[1]:]
    else:
        hf = hf[:, 1:]  # drop the decoder start token
    assert torch.equal(ours, hf)


def test_batched_equals_one_by_one(tiny_causal):
    batched, _, _ = _ours(tiny_causal, PROMPTS, 10)
    for row, prompt in enumerate(PROMPTS):
        single, _, _ = _ours(tiny_causal, [prompt], 10)
        assert torch.equal(batched[row], single[0])


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_causal):
    def run(**kw):
        return generate(tiny_causal, ["Hello there"], SamplingParams(max_new_tokens=15, **kw), chat=False)[0].text

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert len({run(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert run(temperature=1.0, top_k=1, seed=5) == run()
    assert run(temperature=1.0, top_p=1e-6, seed=5) == run()


def test_sampling_transforms():
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    greedy = SamplingParams()
    assert next_tokens(logits, greedy, torch.tensor([[1]]), None).item() == 0
    # repetition penalty 4 on token 0: 2/4 = 0.5 < 1.0, so token 1 wins
    assert next_tokens(logits, SamplingParams(repetition_penalty=4.0), torch.tensor([[0]]), None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {next_tokens(logits, SamplingParams(temperature=1.0, top_k=2), logits.long()[:, :0], g).item()
             for _ in range(200)}
    assert draws == {0, 1}  # top-k=2 never picks the third token, and does sample


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0)])
def test_invalid_sampling_values(bad):
    with pytest.raises(SlmError):
        SamplingParams(**bad).validate()


def test_stop_strings_are_cut_and_stream_holds_back(tokenizer):
    ids = tokenizer("Hello world. Goodbye world.").input_ids
    tracker = _TextTracker(tokenizer, ["Goodbye"], eos={2})
    deltas = [tracker.add(i) for i in ids]
    deltas.append(tracker.close())
    assert "".join(deltas) == tracker.text == "Hello world. "
    assert tracker.finished == "stop"
    assert not any("Good" in d for d in deltas)  # the partial stop string was never emitted


def test_stream_matches_generate_and_finish_reasons(tiny_causal):
    params = SamplingParams(max_new_tokens=9)
    gen = stream(tiny_causal, "A story:", params, chat=False)
    deltas = []
    try:
        while True:
            deltas.append(next(gen))
    except StopIteration as end:
        completion = end.value
    batch = generate(tiny_causal, ["A story:"], params, chat=False)[0]
    assert "".join(deltas) == completion.text == batch.text
    assert batch.finish_reason == "length" and batch.completion_tokens == 9


def test_prompt_longer_than_context(tiny_causal):
    long_prompt = "word " * 300  # the tiny model's context is 128
    with pytest.raises(SlmError, match="context is 128 tokens"):
        generate(tiny_causal, [long_prompt], chat=False)
    # a prompt that fits is generated up to the context, not past it
    fits = "word " * 120
    out = generate(tiny_causal, [fits], SamplingParams(max_new_tokens=50), chat=False)[0]
    assert out.prompt_tokens + out.completion_tokens <= 128


def test_encoder_only_models_do_not_generate(tokenizer):
    from slmkit import zoo

    model = zoo.build_model(zoo.SPECS["roberta-nano"])
    with pytest.raises(SlmError, match="masked-lm"):
        generate(Loaded(model, tokenizer, "roberta-nano", None, "masked-lm"), ["hi"])


def test_chat_template_and_default_system_prompt(tokenizer):
    text = format_prompt(tokenizer, "Hi")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "Hi", chat=False) == "Hi"
    custom = format_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}])
    assert "Be brief." in custom and "helpful assistant" not in custom


def test_embedded_model_knows_paris(smol):
    out = generate(smol, ["The capital of France is", "What is the capital of France?"],
                   SamplingParams(max_new_tokens=24))
    assert all("Paris" in c.text for c in out), [c.text for c in out]
    assert all(c.finish_reason == "stop" for c in out)  # the chat model ends its answer with <|im_end|>


def test_packed_bf16_weights_match_plain_and_follow_updates():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.cpu_packing import pack_linear_weights

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    if not pack_linear_weights(packed):  # e.g. an AMD EPYC without AVX-512: bf16 runs on the plain layers
        with torch.inference_mode():
            assert torch.isfinite(packed(input_ids=torch.randint(0, 512, (2, 9))).logits).all()
        pytest.skip("this CPU's oneDNN has no bf16 linear kernels; the model stays unpacked")
    assert type(packed.lm_head).__name__ == "PackedLinear"
    assert packed.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 512, (2, 9))
    with torch.inference_mode():
        a, b = plain(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # an in-place update (as an optimizer step does) must reach the packed copy
        for m in (plain, packed):
            m.lm_head.weight.mul_(2.0)
    with torch.inference_mode():
        a, b = plain(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(a.float(), b.float(), atol=4e-2, rtol=2e-2)
    fp32 = LlamaForCausalLM(config).eval()
    assert not pack_linear_weights(fp32)  # fp32 models are left as they are


def test_chat_history_is_trimmed_to_fit_the_context(tiny_causal):
    from slmkit.generate import fit_history

    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " + "word " * 10},
                    {"role": "assistant", "content": f"answer {i} " + "word " * 10}]
    history.append({"role": "user", "content": "last question"})
    kept, dropped = fit_history(tiny_causal, history, max_new_tokens=16, system=None)  # the tiny model's context: 128
    assert kept[-1]["content"] == "last question" and kept[0]["role"] == "user"
    assert 1 <= len(kept) < len(history) and len(kept) == len(history) - 2 * dropped
    text = format_prompt(tiny_causal.tokenizer, kept)
    assert len(tiny_causal.tokenizer(text, add_special_tokens=False).input_ids) + 16 <= 128
    generate(tiny_causal, [kept], SamplingParams(max_new_tokens=16))  # fits: no context error


def test_nucleus_keeps_the_top_p_tokens_with_or_without_the_whole_sort():
    """Top-p through topk equals the full sort: a peaked row (nucleus inside the head) and a flat row (the
    nucleus is wider than the head, so every row falls back to sorting)."""
    from slmkit.generate import nucleus

    def by_sorting(logits, top_p):
        s, order = torch.sort(logits, descending=True)
        p = s.softmax(-1)
        return logits.scatter(1, order, s.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf")))

    torch.manual_seed(0)
    peaked = torch.randn(3, 5000) * 6
    flat = torch.randn(2, 5000) * 0.1
    for logits in (peaked, torch.cat([peaked, flat])):
        for top_p in (0.5, 0.9, 0.95):
            got = nucleus(logits, top_p, head=64)
            assert torch.equal(got.isfinite(), by_sorting(logits, top_p).isfinite())
            assert torch.equal(got[got.isfinite()], logits[got.isfinite()])
    assert int(nucleus(peaked, 0.9, head=64).isfinite().sum(-1).max()) < 64  # the peaked rows used the head
