"""Zero-shot answers and their scoring: extraction, option matching, reasoning-gym scorers, rank classification."""

from __future__ import annotations

import re

from slmkit.methods.flan.collection import ANSWER_SEPARATOR, Collection, Item, render


def extract_answer(text: str) -> str:
    """The answer in a reply: after "the answer is" when present, else the first non-empty line, without an
    "Answer:" prefix or trailing period."""
    found = re.findall(r"answer is[:\s]*(.+)", text, flags=re.IGNORECASE)
    line = found[-1] if found else next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(answer|a)\s*[:.]\s*", "", line.strip(), flags=re.IGNORECASE)
    return line.strip().rstrip(".").strip()


def is_correct(item: Item, reply: str) -> bool:
    """Options: the option the reply names (first, as a whole word); otherwise the extracted answer, checked
    by the task's scorer (reasoning-gym) or by equality (case and quotation marks aside)."""
    if item.options:
        from slmkit.client import match_option

        picked = match_option(reply, item.options)
        answer = item.options[picked] if picked is not None else ""
    else:
        answer = extract_answer(reply)
    if item.entry is not None:
        return item.entry["dataset"].score_answer(answer, item.entry["entry"]) >= 1.0
    return _plain(answer) == _plain(item.answer)


def _plain(text: str) -> str:
    """Compared case-insensitively, without surrounding quotation marks or a final period."""
    return text.strip().strip('"\'“”').strip().rstrip(".").lower()


def rank_choice(loaded, prompt: str, options: list[str]) -> str:
    """FLAN's rank classification: the option with the highest log-likelihood as the reply."""
    from slmkit.evaluate import best_option
    from slmkit.generate import format_prompt, is_chat_model

    chat = is_chat_model(loaded.tokenizer)
    text = format_prompt(loaded.tokenizer, prompt) if chat else prompt + ANSWER_SEPARATOR
    return options[best_option(loaded, text, options, templated=chat)]


def zero_shot_accuracy(loaded, items: list[Item], collection: Collection, *, batch_size: int = 16,
                       max_new_tokens: int = 32, rank: bool = False, fmt: str = "zero", progress: bool = True) -> dict:
    """Zero-shot accuracy per task with the first template: greedy generation, or with `rank` the likeliest
    option for tasks that have OPTIONS (FLAN's rank classification); `fmt="cot"` asks for a chain of thought
    (the answer is read after "the answer is"). Returns {"tasks", "mean", "items"}: each task's accuracy, their
    mean, and each item's 0/1 outcome per task (in the order given)."""
    from slmkit.generate import SamplingParams, generate, is_chat_model
    from slmkit.progress import Progress

    chat = is_chat_model(loaded.tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    correct: dict[str, list[int]] = {}
    with Progress(disable=not progress) as bar:
        job = bar.add_task(f"zero-shot eval of {loaded.name}", total=len(items))
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [render(it, (it.task.templates or collection.templates)[0], collection, fmt)[0] for it in batch]
            if not chat:
                prompts = [p + ANSWER_SEPARATOR for p in prompts]
            if rank and all(it.options for it in batch):
                replies = [rank_choice(loaded, p, it.options) for p, it in zip(prompts, batch, strict=True)]
            else:
                replies = [c.text for c in generate(loaded, prompts, params)]
            for it, reply in zip(batch, replies, strict=True):
                correct.setdefault(it.task.name, []).append(int(is_correct(it, reply)))
            bar.advance(job, len(batch))
    tasks = {name: sum(v) / len(v) for name, v in correct.items()}
    return {"tasks": tasks, "mean": sum(tasks.values()) / len(tasks), "items": correct}
