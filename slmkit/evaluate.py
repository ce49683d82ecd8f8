"""Scoring helpers shared by evaluation and by methods that let a language model choose among answers
(SuperICL's label choice, verbalizers, multiple-choice tasks).

`option_logprobs` runs the prompt once, copies its KV cache to one row per option and scores every option
in a single forward: log p(option | prompt), summed over the option's tokens.
"""

from __future__ import annotations

from slmkit.errors import SlmError


def option_logprobs(loaded, prompt: str, options: list[str], *, templated: bool = False) -> list[float]:
    """log p(option | prompt) for each option: a continuation of `prompt`'s text under a causal LM, or the
    decoder's target for the encoded prompt under an encoder-decoder."""
    import torch

    from slmkit.generate import CachedLM

    if loaded.task == "seq2seq":
        return _target_logprobs(loaded, prompt, options)
    if loaded.task != "causal-lm":
        raise SlmError(f"{loaded.name} is a {loaded.task} model; scoring options needs a causal LM or seq2seq")
    tok = loaded.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=not templated).input_ids
    option_ids = []
    for o in options:
        full = tok(prompt + o, add_special_tokens=not templated).input_ids
        # the option's own tokens, where the prompt's tokens survive as a prefix (a clean boundary)
        same_prefix = full[:len(prompt_ids)] == prompt_ids
        option_ids.append(full[len(prompt_ids):] if same_prefix else tok(o, add_special_tokens=False).input_ids)
    if any(not ids for ids in option_ids):
        raise SlmError("an option adds no tokens to the prompt; options must be non-empty text")
    if loaded.context_length and len(prompt_ids) + max(map(len, option_ids)) > loaded.context_length:
        raise SlmError(f"the prompt is {len(prompt_ids)} tokens, too long for {loaded.name}'s context of "
                       f"{loaded.context_length}; use fewer or shorter demonstrations")
    ids = torch.tensor([prompt_ids])
    lm = CachedLM(loaded.model, ids, torch.ones_like(ids))
    first = lm.prefill(ids)[0, -1].float().log_softmax(-1)  # the distribution of each option's first token
    width = max(map(len, option_ids))
    lm.select([0] * len(options))
    scores = [float(first[o[0]]) for o in option_ids]
    if width > 1:  # the rest of every option in one forward; right padding is never attended by real tokens
        pad = tok.pad_token_id if tok.pad_token_id is not None else option_ids[0][0]
        rest = torch.tensor([o + [pad] * (width - len(o)) for o in option_ids])
        logprobs = lm.step(rest[:, :-1]).float().log_softmax(-1)
        for row, o in enumerate(option_ids):
            scores[row] += sum(float(logprobs[row, j - 1, o[j]]) for j in range(1, len(o)))
    return scores


def _target_logprobs(loaded, prompt: str, options: list[str]) -> list[float]:
    import torch

    tok = loaded.tokenizer
    targets = [tok(o, add_special_tokens=False).input_ids for o in options]
    if any(not t for t in targets):
        raise SlmError("an option has no tokens; options must be non-empty text")
    enc = tok(prompt, return_tensors="pt")
    labels = torch.full((len(options), max(map(len, targets))), -100)
    for row, t in enumerate(targets):
        labels[row, :len(t)] = torch.tensor(t)
    with torch.inference_mode():
        logits = loaded.model(input_ids=enc.input_ids.expand(len(options), -1),
                              attention_mask=enc.attention_mask.expand(len(options), -1), labels=labels).logits
    logprobs = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logprobs * (labels != -100)).sum(-1).tolist()


def best_option(loaded, prompt: str, options: list[str], *, templated: bool = False) -> int:
    """Rank classification: the index of the option with the highest log p(option | prompt)."""
    scores = option_logprobs(loaded, prompt, options, templated=templated)
    return max(range(len(options)), key=scores.__getitem__)
