"""FLAME (Joshi et al., 2024: "FLAME: A small language model for spreadsheet formulas"): data.

A small T5-style model for Excel formulas. This module makes its data, offline and deterministically from a
seed:
- `random_formula`: a generator of realistic formulas - functions across math, logic, lookup, text and date
  (nested), cell references (relative, absolute, mixed), ranges, sheet references (quoted when needed),
  named ranges, number / string / boolean literals, arithmetic, comparison and concatenation operators;
- `sketch`: a formula with its references and literals abstracted away; the corpus keeps one formula per
  sketch (FLAME deduplicates by sketch so frequent shapes do not swamp the rare ones);
- `check_formula`: every formula must tokenise with openpyxl's formula tokenizer and parse with the
  `formulas` library; `evaluate` computes a formula over a small sheet of values (for "evaluates the same"
  metrics);
- `corrupt`: last-mile repair pairs - missing / extra parentheses, wrong argument separators, misspelled
  function names, swapped arguments, missing quotes - each kind named, so metrics can be reported per kind;
- `FORMULA_SPLIT`: formula-aware pre-tokenisation for a byte-level BPE (`slmkit.data.tokenizers.train_bpe`):
  functions with their "(", sheet prefixes and words whole, column letters and numbers as pieces of their
  own, so the model can copy references from frequent tokens.

and trains and uses it:
- `PRETRAIN_OBJECTIVES`: FLAME's four pretraining objectives, one sampled per example (weighted), each asking
  for the *whole* original formula back - tail masking and random noise (generic), language-aware span
  masking (whole pieces) and user-inspired noise (the corruptions above); so pretraining already teaches the
  copying that repair needs;
- `flame_train`: the zoo's FLAME spec (T5-style; `flame-nano` here, `flame-60m` real size) pretrained on
  those pairs, then fine-tuned on two tasks with task prefixes - `repair: BROKEN` -> formula and
  `complete: PREFIX` -> formula;
- `flame_eval`: exact match after normalisation on held-out repair pairs, per corruption kind, against
  the copy-the-input baseline; the parse rate of the outputs; exact match of completions;
- `retrieval_objective`: the tuning loss plus an in-batch contrastive term that pulls each example's
  encoded input (a broken formula, a prefix) towards its encoded target formula, so the encoder's pooled
  states become a search embedding;
- `repair`, `complete`, `search` (retrieval: cosine similarity of mean-pooled encoder states).

The stages, one module each, in pipeline order: formulas.py (generator, sketches, checks), noise.py
(corruptions, pretraining objectives), corpus.py (`flame_data`), model.py (train, use, evaluate).
"""

from .corpus import completion_prefix, flame_data, formula_corpus  # noqa: F401
from .formulas import (  # noqa: F401
    FORMULA_PIECES,
    FORMULA_SPLIT,
    NAMES,
    NUM_FUNCS,
    REF,
    SHEETS,
    TXT_FUNCS,
    WORDS,
    cell,
    cell_range,
    check_formula,
    cond,
    criteria,
    date,
    equivalent,
    evaluate,
    num,
    number,
    random_formula,
    random_sheet,
    sketch,
    text,
    txt,
)
from .model import (  # noqa: F401
    complete,
    embed,
    flame_eval,
    flame_train,
    nearest,
    normalise,
    pooled,
    repair,
    retrieval_objective,
    search,
    token_accuracy,
)
from .noise import (  # noqa: F401
    COMPLETE,
    CORRUPTIONS,
    MASK,
    MISSPELL,
    PRETRAIN_OBJECTIVES,
    PRETRAIN_VARIANTS,
    REPAIR,
    TASK_PROMPTS,
    corrupt,
    pretrain_pair,
    random_noise,
    span_mask,
    tail_mask,
    user_noise,
)
