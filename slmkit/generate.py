"""Batched and streaming text generation with a KV cache, for decoder-only and encoder-decoder models.

The decode loop is written out here rather than delegated to `model.generate`: one forward per step
over the cached keys/values, the few sampling transforms a user asks for, and nothing else per token.
`stream()` yields text as it is produced; `generate()` runs a batch (left-padded) to completion.
Both stop at EOS, at a stop string (cut from the output) or at `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from slmkit.cpu_packing import pack_linear_weights
from slmkit.errors import SlmError


@dataclass
class SamplingParams:
    """How to pick tokens. Temperature 0 is greedy decoding."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens to generate per prompt."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; >0 samples (0.7 is typical)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens "
                                                         "whose probability adds up to this."})
    top_k: int = field(default=0, metadata={"help": "Sample only among the k likeliest tokens (0 = all)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalise tokens already seen "
                                                                      "(1.0 = off, 1.1-1.3 typical)."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for reproducible sampling."})
    ignore_eos: bool = field(default=False, metadata={"help": "Keep generating past the end-of-sequence token "
                                                               "(for benchmarks)."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Stop when this text appears "
                                                                     "(repeatable); it is cut from the output."})

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
        ]
        for ok, message in checks:
            if not ok:
                raise SlmError(message)
        return self


@dataclass
class Completion:
    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


# --- prompts ---------------------------------------------------------------------------------------------


def is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


DEFAULT_SYSTEM = "You are a helpful assistant."


def format_prompt(tokenizer, prompt: str | list[dict], *, system: str | None = None,
                  chat: bool | None = None, generation_prompt: bool = True) -> str:
    """Apply the chat template for chat models (or when given messages); plain text otherwise. With
    `generation_prompt=False` the text ends after the last message (how training renders a conversation).

    Chat prompts get slmkit's generic system prompt unless the messages or `system` give one: templates
    that insert their own identity prompt (SmolLM2's "You are ... named SmolLM") otherwise steer short
    prompts off course (the embedded model then fails to complete "The capital of France is").
    """
    if chat is None:
        chat = is_chat_model(tokenizer)
    if isinstance(prompt, list):
        messages = prompt
    elif chat:
        messages = [{"role": "user", "content": prompt}]
    else:
        return prompt
    if not is_chat_model(tokenizer):
        raise SlmError("this model's tokenizer has no chat template; use plain prompts (--no-chat)")
    return tokenizer.apply_chat_template(with_system(messages, system), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def with_system(messages: list[dict], system: str | None = None) -> list[dict]:
    """The messages with a system prompt first: theirs if they have one, else `system`, else slmkit's default."""
    if any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": DEFAULT_SYSTEM if system is None else system}, *messages]


def stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    return ids


# --- sampling --------------------------------------------------------------------------------------------


def next_tokens(logits, params: SamplingParams, seen, generator):
    """Pick one token per row from last-position logits (batch, vocab), in float32."""
    import torch

    logits = logits.float()
    if params.repetition_penalty != 1.0:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = nucleus(logits, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def nucleus(logits, top_p: float, head: int = 256):
    """Top-p filtering: keep the most likely tokens until their probability reaches `top_p` (the token that
    crosses it included), the rest -inf. A nucleus almost always lies within the `head` likeliest tokens, so
    they are found with topk; if some row's is wider, the whole vocabulary is sorted (sorting 49K logits per
    row was a quarter of best-of-N sampling time)."""
    import torch

    full = logits.softmax(-1)
    top, order = torch.topk(logits, min(head, logits.shape[-1]))
    probs = full.gather(1, order)
    if not bool((probs.sum(-1) >= top_p).all()):
        top, order = torch.sort(logits, descending=True)
        probs = full.gather(1, order)
    drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
    return torch.full_like(logits, float("-inf")).scatter(1, order, top.masked_fill(drop, float("-inf")))


# --- the decode loop -------------------------------------------------------------------------------------


class CachedLM:
    """One model's running KV cache over a left-padded batch. `step(ids)` feeds new tokens (one or a few
    per row) and returns their logits; `crop`, `select` and `merge` let speculative decoding roll back and
    the server's continuous batching drop finished rows and add new ones. EFT keeps three of these.

    Decoder-only rows carry an attention mask and position ids, so rows of different lengths share one
    cache; an encoder-decoder model runs its encoder once and caches the decoder (crop works, not merge)."""

    def __init__(self, model, input_ids, attention_mask):
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        pack_linear_weights(model)
        self.model, self.encoder_decoder = model, bool(model.config.is_encoder_decoder)
        self.mask = attention_mask
        with torch.inference_mode():
            if self.encoder_decoder:
                self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                self.encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
                self.decoded = 0
            else:
                self.cache = DynamicCache(config=model.config)
                self.positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (batch, time)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def prefill(self, input_ids, keep: int = 1):
        """Run the prompt (decoder-only) or the decoder start token (encoder-decoder); last `keep` logits."""
        if self.encoder_decoder:
            start = self.model.config.decoder_start_token_id
            input_ids = self.mask.new_full((self.batch, 1), start if start is not None else 0)
        return self._forward(input_ids, self.positions if not self.encoder_decoder else None, keep)

    def step(self, ids, keep: int | None = None):
        """Append `ids` (batch, k) to every row and return logits (batch, keep or k, vocab)."""
        k = ids.shape[1]
        if self.encoder_decoder:
            return self._forward(ids, None, keep or k)
        import torch

        new_positions = self.positions[:, -1:] + torch.arange(1, k + 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, k)], dim=1)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        return self._forward(ids, new_positions, keep or k)

    def _forward(self, ids, positions, keep):
        import torch

        with torch.inference_mode():
            if self.encoder_decoder:
                self.decoded += ids.shape[1]
                return self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.mask,
                                  decoder_input_ids=ids, cache=self.cache, use_cache=True).logits[:, -keep:]
            return self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                              use_cache=True, logits_to_keep=keep).logits

    def length(self) -> int:
        return self.decoded if self.encoder_decoder else self.mask.shape[1]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` columns (rejected speculative tokens)."""
        cache = self.cache.self_attention_cache if self.encoder_decoder else self.cache
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        if self.encoder_decoder:
            self.decoded = length
        else:
            self.mask, self.positions = self.mask[:, :length], self.positions[:, :length]

    def select(self, rows) -> None:
        """Keep only these rows (finished requests leave) and drop columns that are padding in every row."""
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long)
        self.mask, self.positions = self.mask[rows], self.positions[rows]
        first = int(self.mask.any(0).float().argmax()) if len(rows) else 0
        self.mask, self.positions = self.mask[:, first:], self.positions[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows, :, first:], layer.values[rows, :, first:]

    def copy_rows(self, rows) -> CachedLM:
        """A new cache of these rows (repeats allowed); this one is left as it is (a kept prefill reused)."""
        import copy

        twin = copy.copy(self)
        twin.cache = copy.copy(self.cache)
        twin.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        twin.select(rows)  # indexing makes new tensors for the twin only
        return twin

    def merge(self, other: CachedLM) -> None:
        """Append the rows of `other` (same model), left-padding the shorter history with masked columns."""
        import torch
        from torch.nn.functional import pad

        if self.encoder_decoder:
            raise SlmError("encoder-decoder caches cannot be merged")
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left(t, dim_from_end):
            return pad(t, (0, 0) * (dim_from_end - 1) + (width - t.shape[-dim_from_end], 0))

        self.mask = torch.cat([left(self.mask, 1), left(other.mask, 1)])
        self.positions = torch.cat([left(self.positions, 1), left(other.positions, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
            mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])


def decode_tokens(model, input_ids, attention_mask, params: SamplingParams, eos: set[int], *,
                  lm_class=CachedLM) -> Iterator:
    """Yield a (batch,) tensor of next tokens each step; finished rows repeat EOS. Keeps one KV cache
    (`lm_class` may combine several models: anything with CachedLM's `prefill` and `step`)."""
    import torch

    batch = input_ids.shape[0]
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    eos_t = torch.tensor(sorted(eos) or [-1])
    pad = int(eos_t[0]) if eos else 0
    done = torch.zeros(batch, dtype=torch.bool)
    seen = input_ids
    lm = lm_class(model, input_ids, attention_mask)
    tokens = None
    for _ in range(params.max_new_tokens):
        logits = (lm.prefill(input_ids) if tokens is None else lm.step(tokens[:, None]))[:, -1]
        # each step runs under inference_mode; it is not held across `yield`, so the caller's code is unaffected
        with torch.inference_mode():
            tokens = next_tokens(logits, params, seen, generator)
            tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
            done = done | torch.isin(tokens, eos_t)
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, tokens[:, None]], dim=1)
        yield tokens
        if bool(done.all()):
            return


class _TextTracker:
    """Turns one row's growing token list into text deltas, holding back half-decoded characters and any
    tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: list[str], eos: set[int]):
        self.tokenizer, self.stop, self.eos = tokenizer, stop, eos
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.finished: str | None = None

    def add(self, token: int) -> str:
        if self.finished:
            return ""
        if token in self.eos:
            self.finished = "stop"
            return self._flush(self.text)
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.finished = "stop"
                self.text = self.text[:at]
                return self._flush(self.text)
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._flush(self.text[:safe])

    def close(self) -> str:
        self.finished = self.finished or "length"
        return self._flush(self.text)

    def _flush(self, upto: str) -> str:
        delta = upto[self.emitted:] if len(upto) > self.emitted else ""
        self.emitted = max(self.emitted, len(upto))
        return delta


def encode(tokenizer, prompts: list[str], context: int | None, max_new_tokens: int, encoder_decoder: bool,
           templated: bool = False):
    """Left-pad a batch; refuse prompts that do not fit the context; clamp max_new_tokens to what fits.
    Chat-templated text already holds its special tokens, so none are added to it."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    length = batch.input_ids.shape[1]
    if context and not encoder_decoder:
        if length >= context:
            raise SlmError(f"prompt is {length} tokens but the model's context is {context} tokens; shorten it")
        max_new_tokens = min(max_new_tokens, context - length)
    return batch.input_ids, batch.attention_mask, max_new_tokens


def _prepare(loaded, prompts, params: SamplingParams, system, chat):
    if loaded.task not in ("causal-lm", "seq2seq") and not takes_images(loaded):
        raise SlmError(f"{loaded.name} is a {loaded.task} model; only causal-lm and seq2seq models generate text")
    if loaded.tokenizer is None:
        raise SlmError(f"{loaded.name} has no tokenizer; save one beside the model to generate text")
    params.validate()
    tok = loaded.tokenizer
    texts = [format_prompt(tok, p, system=system, chat=chat) for p in prompts]
    templated = any(isinstance(p, list) for p in prompts) or (chat if chat is not None else is_chat_model(tok))
    encoder_decoder = loaded.engine is None and loaded.model.config.is_encoder_decoder
    ids, mask, max_new = encode(tok, texts, loaded.context_length, params.max_new_tokens, encoder_decoder, templated)
    run_params = SamplingParams(**{**params.__dict__, "max_new_tokens": max_new})
    eos = set() if params.ignore_eos else stop_ids(loaded)
    return texts, ids, mask, run_params, eos


def stop_ids(loaded) -> set[int]:
    """The tokens that end a reply: the model's and tokenizer's EOS, and an engine's own."""
    if loaded.engine is not None:
        return loaded.engine.eos | stop_token_ids(None, loaded.tokenizer)
    return stop_token_ids(loaded.model, loaded.tokenizer)


def takes_images(loaded) -> bool:
    """Whether the model's engine takes pictures beside the prompt (a LLaVA-style model's does)."""
    return getattr(loaded.engine, "takes_images", False)


def check_images(loaded, images) -> None:
    if images and not takes_images(loaded):
        raise SlmError(f"{loaded.name} does not take images (a LLaVA-style model does: `slm llava assemble`)")


def decoder(loaded, decode=None, images=None):
    """The token loop: `decode` if given (EFT), the engine's (llama.cpp, vLLM, a vision model's), else slmkit's
    own. `images` (PIL images for the prompt's image placeholders) need an engine that takes them."""
    run = decode or (loaded.engine.decode if loaded.engine is not None else decode_tokens)
    if not images:
        return run
    check_images(loaded, images)
    return lambda *args: run(*args, images=images)


def stream(loaded, prompt: str | list[dict], params: SamplingParams | None = None, *,
           system: str | None = None, chat: bool | None = None, decode=None, images=None) -> Iterator[str]:
    """Yield text deltas for one prompt as tokens are generated. Returns the Completion at the end
    (available as `StopIteration.value`, or use `generate(..., on_text=...)`). `decode` replaces the token
    loop (same signature as `decode_tokens`; EFT passes its combined-model loop)."""
    params = params or SamplingParams()
    texts, ids, mask, run_params, eos = _prepare(loaded, [prompt], params, system, chat)
    tracker = _TextTracker(loaded.tokenizer, list(params.stop), eos)
    for tokens in decoder(loaded, decode, images)(loaded.model, ids, mask, run_params, eos):
        delta = tracker.add(int(tokens[0]))
        if delta:
            yield delta
        if tracker.finished:
            break
    delta = tracker.close()
    if delta:
        yield delta
    return Completion(texts[0], tracker.text, ids.shape[1], len(tracker.ids), tracker.finished or "length")


def generate(loaded, prompts: list[str | list[dict]], params: SamplingParams | None = None, *,
             system: str | None = None, chat: bool | None = None, on_text=None, decode=None,
             images: list[list] | None = None) -> list[Completion]:
    """Generate for a batch of prompts at once. `on_text(row, delta)` receives text as it is produced;
    `decode` replaces the token loop as in `stream`; `images` gives each prompt its images."""
    params = params or SamplingParams()
    if loaded.engine is not None and not hasattr(loaded.engine, "sequences") and len(prompts) > 1:
        # an engine with its own token loop (vLLM, a vision model's) decodes one prompt at a time
        return [c for row, p in enumerate(prompts) for c in generate(
            loaded, [p], params, system=system, chat=chat,
            on_text=on_text and (lambda _, delta, row=row: on_text(row, delta)), decode=decode,
            images=images and [images[row]])]
    texts, ids, mask, run_params, eos = _prepare(loaded, prompts, params, system, chat)
    trackers = [_TextTracker(loaded.tokenizer, list(params.stop), eos) for _ in prompts]
    for tokens in decoder(loaded, decode, images and images[0])(loaded.model, ids, mask, run_params, eos):
        for row, tracker in enumerate(trackers):
            delta = tracker.add(int(tokens[row]))
            if delta and on_text:
                on_text(row, delta)
        if all(t.finished for t in trackers):
            break
    results = []
    for row, tracker in enumerate(trackers):
        delta = tracker.close()
        if delta and on_text:
            on_text(row, delta)
        prompt_tokens = int(mask[row].sum())
        results.append(Completion(texts[row], tracker.text, prompt_tokens, len(tracker.ids), tracker.finished))
    return results


def fit_history(loaded, history: list[dict], max_new_tokens: int, system: str | None) -> tuple[list[dict], int]:
    """Drop the oldest exchanges until the conversation plus the reply fits the model's context; return the
    conversation and how many exchanges were dropped."""
    dropped = 0
    while loaded.context_length and len(history) > 1:
        text = format_prompt(loaded.tokenizer, history, system=system, chat=True)
        if len(loaded.tokenizer(text, add_special_tokens=False).input_ids) + max_new_tokens <= loaded.context_length:
            break
        history, dropped = history[2:], dropped + 1
    return history, dropped
