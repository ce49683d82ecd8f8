"""Scoring helpers shared by evaluation and by methods that let a language model choose among answers
(SuperICL's label choice, verbalizers, multiple-choice tasks).

`option_logprobs` runs the prompt once, copies its KV cache to one row per option and scores every option
in a single forward: log p(option | prompt), summed over the option's tokens.
"""

from __future__ import annotations

from pathlib import Path

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


# --- perplexity ------------------------------------------------------------------------------------------


def perplexity(loaded, data: str = "brown", tokens: int = 16_384, seq_len: int = 512, batch_size: int = 4,
               progress: bool = True) -> dict:
    """Token-level perplexity of a causal LM on text (a packaged corpus, a file or a directory): documents
    joined by EOS, the first `tokens` tokens cut into `seq_len` windows, each token predicted within its
    window. The same data and cut for every model, so the numbers compare (e.g. fp32 vs `--dtype int8`)."""
    import math

    import torch

    from slmkit.data.corpora import documents
    from slmkit.progress import Progress

    llamacpp = loaded.model is None and hasattr(loaded.engine, "sequences")
    if loaded.task != "causal-lm" or (loaded.model is None and not llamacpp):
        raise SlmError(f"{loaded.name}: perplexity is measured on a causal LM on the torch or llama.cpp engine")
    tok = loaded.tokenizer
    ids: list[int] = []
    for doc in documents(data):
        ids += tok(doc, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) >= tokens:
            break
    windows = [ids[i:i + seq_len] for i in range(0, min(len(ids), tokens), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise SlmError(f"{data}: no text to measure perplexity on")
    nll, count = 0.0, 0
    with Progress(disable=not progress) as bar, torch.inference_mode():
        job = bar.add_task(f"perplexity on {data}", total=len(windows))
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            width = max(map(len, batch))
            x = torch.tensor([w + [tok.eos_token_id] * (width - len(w)) for w in batch])
            mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch])
            if llamacpp:  # each window one sequence, the logits of every position kept
                loaded.engine.reserve(1, width)
                rows = [loaded.engine.sequences(torch.tensor([w]), torch.ones(1, len(w))).prefill(keep=len(w))[0, :-1]
                        for w in batch]
                logits = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - 1 - len(r))) for r in rows])
            else:
                logits = loaded.model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            target, keep = x[:, 1:], mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += float(losses[keep].sum())
            count += int(keep.sum())
            bar.advance(job, len(batch))
    return {"model": loaded.name, "data": data, "tokens": count, "seq_len": seq_len, "nll": nll / count,
            "perplexity": math.exp(nll / count)}


# --- lm-eval ---------------------------------------------------------------------------------------------

# Tasks built from packaged data, so lm-eval runs with no dataset hub: written once as lm-eval task YAMLs
# over local JSON-lines files (lm-eval's `json` dataset loader).
LOCAL_TASKS = {
    "slmkit_spam": "spam-assassin emails, 'is this email spam?' as a two-way multiple choice (accuracy)",
    "slmkit_arithmetic": "reasoning-gym basic arithmetic (2-3 terms), answer generated and matched exactly",
    "slmkit_brown": "the Brown corpus, rolling log-likelihood (word and byte perplexity, bits per byte)",
}


def _spam_rows(n: int = 200) -> list[dict]:
    import random

    from slmkit.data.spam import spam_assassin

    rows = spam_assassin()
    rng = random.Random(0)
    spam = [r for r in rows if r["label"] == "spam"]
    ham = [r for r in rows if r["label"] == "ham"]
    picked = rng.sample(spam, n // 2) + rng.sample(ham, n - n // 2)
    rng.shuffle(picked)
    return [{"text": r["text"][:600], "label": int(r["label"] == "spam")} for r in picked]


def _arithmetic_rows(n: int = 200) -> list[dict]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=0, min_terms=2, max_terms=3,
                                        min_digits=1, max_digits=2)
    return [{"question": x["question"], "answer": x["answer"]} for x in data]


def _brown_rows(n: int = 50) -> list[dict]:
    from itertools import islice

    from slmkit.data.corpora import documents

    # the first ~2,000 characters of each document, cut at a sentence end: rolling log-likelihood stays cheap
    return [{"text": text[:2000].rsplit(". ", 1)[0] + "."} for text in islice(documents("brown"), n)]


_TASK_YAML = {
    "slmkit_spam": """output_type: multiple_choice
doc_to_text: "Email: {{text}}\\nQuestion: Is this email spam?\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "slmkit_arithmetic": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "slmkit_brown": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}
_TASK_ROWS = {"slmkit_spam": _spam_rows, "slmkit_arithmetic": _arithmetic_rows, "slmkit_brown": _brown_rows}


def local_tasks_dir() -> Path:
    """Write (once) the packaged lm-eval tasks: DIR/NAME/NAME.yaml + test.jsonl."""
    import json

    from slmkit.models import cache_dir

    root = cache_dir() / "lm_eval_tasks"
    for name, template in _TASK_YAML.items():
        folder = root / name
        data = folder / "test.jsonl"
        if not data.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = data.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in _TASK_ROWS[name]()))
            tmp.replace(data)
        header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {json.dumps(str(data))}\ntest_split: test\nmetadata:\n  version: 1.0\n")
        (folder / f"{name}.yaml").write_text(header + template)
    return root


def lm_eval_tasks(loaded, tasks: list[str], *, include: list[Path] | None = None, limit: int | None = None,
                  batch_size: int = 8, num_fewshot: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks against a model through lm-eval's own HF model class (`HFLM` over the
    loaded `transformers` model). Tasks: the packaged LOCAL_TASKS, task YAMLs in `include` directories, or
    lm-eval's built-in tasks when their datasets are available locally. Returns {task: {metric: value}}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SlmError("lm-eval tasks need lm-evaluation-harness: pip install 'slmkit[eval]'") from e
    if loaded.model is None or loaded.task != "causal-lm":
        raise SlmError(f"{loaded.name}: lm-eval runs a causal LM on the torch engine")
    for path in include or []:
        if not Path(path).is_dir():
            raise SlmError(f"task directory not found: {path}")
    builtin = any(t not in LOCAL_TASKS for t in tasks) and not include
    manager = TaskManager(include_path=[str(local_tasks_dir()), *map(str, include or [])], include_defaults=builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SlmError(f"unknown lm-eval task '{unknown[0]}' (packaged: {', '.join(LOCAL_TASKS)}; or give --include "
                       "DIR with task YAMLs)")
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0)
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def evaluate_model(model: str | None = None, text: str | None = None, tokens: int = 16_384, seq_len: int = 512,
                   tasks: list[str] | None = None, include: list[Path] | None = None, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, dtype: str = "fp32",
                   progress: bool = True) -> dict:
    """Evaluate a model: perplexity on text, and lm-evaluation-harness tasks through lm-eval's own HF model class
    (packaged local tasks run with no dataset hub). Compare quantisations with --dtype int8 / bf16.

    With neither `text` nor `tasks`, perplexity on the Brown corpus.

    Args:
        model: Zoo name, model directory, .gguf file or hub id (default: the embedded SmolLM2).
        text: Perplexity on this text: a packaged corpus (brown, austen, python-docs...) or a .txt/.jsonl file.
        tokens: Perplexity: tokens measured.
        seq_len: Perplexity: window length in tokens.
        tasks: lm-eval tasks (repeatable): slmkit_spam, slmkit_arithmetic, slmkit_brown, or yours via --include.
        include: A directory of lm-eval task YAMLs (repeatable).
        limit: lm-eval: at most this many examples per task.
        num_fewshot: lm-eval: demonstrations per prompt.
        batch_size: Sequences per forward pass.
        dtype: auto (bf16 where the CPU has bf16 units), fp32, bf16, fp16, or int8 (torch engine: int8 weights,
            bf16 activations).
    """
    from slmkit.models import load

    if not text and not tasks:
        text = "brown"
    loaded = load(model, dtype=dtype)
    result: dict = {"model": loaded.name, "dtype": dtype}
    if text:
        result["perplexity"] = perplexity(loaded, text, tokens, seq_len, min(batch_size, 4), progress=progress)
    if tasks:
        result["tasks"] = lm_eval_tasks(loaded, tasks, include=include, limit=limit, batch_size=batch_size,
                                        num_fewshot=num_fewshot)
    return result


def report(r: dict, args: dict, out) -> None:
    if "perplexity" in r:
        p = r["perplexity"]
        out.print(f"perplexity on {p['data']}: {p['perplexity']:.3f} ({p['tokens']:,} tokens, windows of "
                  f"{args['seq_len']}, {r['dtype']})")
    for task, metrics in r.get("tasks", {}).items():
        out.print(f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
