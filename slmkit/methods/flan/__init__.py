"""FLAN and Flan-T5 instruction tuning (Wei et al., 2022, "Finetuned Language Models Are Zero-Shot Learners";
Chung et al., 2022, "Scaling Instruction-Finetuned Language Models").

Many tasks, each rendered through about ten natural-language templates (some "turned around": from the
answer, write the question), with an `OPTIONS:` list for classification, in zero-shot, few-shot and
chain-of-thought formats; mixed in proportion to each task's size up to a per-task cap. The evaluation that
makes FLAN's point holds out a whole task cluster: tune on every other cluster, then measure zero-shot
accuracy on the held-out one, before and after.

Tasks come from `slmkit/data/flan/tasks.yaml` (reasoning-gym generators with their scorers, grouped in
clusters, plus a topic-classification set) and from users' YAML files of the same shape. Everything is
deterministic from a seed. The mixture is prompt/completion JSONL that `slm finetune` trains on (chat
models get it through their chat template, plain ones as prompt, newline, answer; the loss is on the answer only).

The files, in pipeline order:
    collection.py  tasks, clusters and templates; examples; rendering (zero-shot, few-shot, CoT, OPTIONS); the mixture
    scoring.py     answers read from replies, scored by the task's scorer; zero-shot accuracy (generation or rank)
    workflows.py   `slm flan list / build / train / eval`
    heldout.py     `slm flan proof`: held-out clusters x seeds, accuracy as training clusters grow, CoT vs no CoT
"""

from .collection import (  # noqa: F401
    PACKAGED_TASKS,
    RATIONALES,
    Collection,
    Item,
    Task,
    build_mixture,
    load_collection,
    make_items,
    render,
)
from .heldout import flan_proof  # noqa: F401
from .scoring import extract_answer, is_correct, rank_choice, zero_shot_accuracy  # noqa: F401
from .workflows import HELP, flan_build, flan_eval, flan_list, flan_train, training_rows  # noqa: F401
