"""TinyGSM (Liu et al., 2023, "TinyGSM: achieving >80% on GSM8k with small language models").

Grade-school math word problems paired with Python solutions: a function whose docstring holds the
question and whose body computes the answer step by step in named variables, then returns it. A small
generator model is fine-tuned on them; a verifier of the same size scores sampled solutions, and the best
of N is the answer. Every program runs in `slmkit.sandbox`.

The stages, one module each, in pipeline order:
    problems.py   procedural problems (templates, stories), held-out shapes, the GSM8K-style test set
    data.py       `gsm_data`: procedural, teacher and user problems into a training file
    generator.py  `gsm_train`, `solve`: the program writer, sampled and executed
    verifier.py   `verify_train`, `verifier_scores`: correctness predicted from the generator's own samples
    evaluate.py   `gsm_eval`: pass@1, majority vote, verifier best-of-N
"""

from .data import (  # noqa: F401
    TEACHER_PROMPT,
    TEST_SETS,
    accept_programs,
    extract_program,
    gsm_data,
    matches,
    read_user_problems,
    test_problems,
    training_problems,
)
from .evaluate import best_of_n, gsm_eval, plot_best_of_n  # noqa: F401
from .generator import STOP, Sample, gsm_solve, gsm_train, majority, program_body, program_prompt, solve, training_rows  # noqa: F401
from .problems import (  # noqa: F401
    EVENTS,
    GOODS,
    HELD_OUT_LONG_STORIES,
    HELD_OUT_STORIES,
    HELD_OUT_TEMPLATES,
    LONG_STORY_TEMPLATES,
    NAMES,
    QUESTIONS,
    SHOPS,
    STORY_TEMPLATES,
    TEMPLATES,
    Problem,
    ages,
    change_from_purchase,
    discount_price,
    fence_perimeter,
    full_boxes,
    gsm_symbolic,
    more_than,
    ngrams,
    normalise,
    overlap,
    pages_left,
    procedural,
    production_over_days,
    ratio_split,
    remaining_after_giving,
    share_equally,
    story,
    template,
    tickets_for_group,
    two_speeds,
    wage_with_bonus,
    weekly_savings,
)
from .verifier import (  # noqa: F401
    VerifierData,
    ranking_auc,
    sample_labelled,
    verifier_from,
    verifier_objective,
    verifier_scores,
    verify_train,
)
