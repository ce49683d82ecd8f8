"""PET and iPET (Schick & Schütze, 2021: "Exploiting Cloze Questions for Few Shot Text Classification and
Natural Language Inference"; "It's Not Just Size That Matters: Small Language Models Are Also Few-Shot
Learners").

Classification as a cloze question. A *pattern* turns an input into text with a mask slot
("{text} All in all, this email is {mask}."), a *verbalizer* maps each label to a word (spam → "spam",
ham → "fine"); a pattern-verbalizer pair (PVP) scores a label by the language model's logit for its word at
the mask. With a masked LM the slot is the mask token; with a causal LM the text up to `{mask}` is the prompt
and each word is scored as the next token.

PET, with a handful of labelled examples and many unlabelled ones:
1. one model per PVP is fine-tuned on the labelled examples: cross-entropy over the verbalizer logits, plus
   a small auxiliary language-modelling loss on unlabelled text (weight `aux_weight`, 1e-4 as in PET);
2. the ensemble (each member weighted by its accuracy on the labelled set before training) soft-labels the
   unlabelled set: softmax of the weighted mean logits at temperature T = 2;
3. a final sequence classifier learns those soft labels (`slmkit.methods.kd.soft_cross_entropy`).
iPET repeats step 1 in generations: each member of generation g trains on the labels plus examples the
ensemble of a random subset of the other generation-(g-1) members labelled, drawn with probability
proportional to confidence and in the labelled set's label proportions, the set growing `growth`-fold per
generation; the last generation's ensemble labels the data for the final classifier.

`pet()` also trains the plain fine-tuning baseline (the same model with a classification head on the same
labels) and reports every accuracy on one held-out test set.

The files, in pipeline order:
    cloze.py     pattern-verbalizer pairs, cloze examples, verbalizer logits, the PET objective
    ensemble.py  one model per PVP (members), the weighted ensemble, iPET's pseudo-labelled sets, the final
                 classifier that learns the soft labels
    workflow.py  `slm pet`: splits, PET / iPET generations against plain fine-tuning over seeds, plot, report
"""

from .cloze import DEFAULT_PVPS, PVP, Cloze, ClozeData, cloze_logits, load_pvps, pet_objective, verbalizer_logits  # noqa: F401
from .ensemble import Member, ensemble_logits, pseudo_labelled, softmax, train_classifier, train_member  # noqa: F401
from .workflow import pet, plot_pet, report, split_data  # noqa: F401
