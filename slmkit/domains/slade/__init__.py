"""SLaDe: a small encoder-decoder that decompiles optimised assembly back to C (Armengol-Estapé et al.).

The model reads the normalised x86-64 assembly of one function (gcc -O0 or -O3) and writes C: the
declarations the function needs (struct typedefs, `extern` globals, callee prototypes: *type inference*,
since none of them is visible in the function's own assembly except through offsets, symbols and calls)
followed by the function. What counts is **IO accuracy** (ExeBench style): the prediction is compiled with
gcc, linked with a harness that calls it on test inputs, run in `slmkit.sandbox`, and its output compared
with the original function's.

Everything is built offline and deterministically from a seed:

- `random_program`: a small C program: optional context (a struct, a global table or scalar, a helper
  function) and one target function (scalar arithmetic, array loops, struct fields, digit loops, in-place
  array updates) whose parameters the IO harness knows how to feed.
- `compile_asm` + `normalise_asm`: gcc -S at each level, the target function's instructions cut out,
  directives dropped, local labels renumbered, referenced constants (`.LC0`) appended, and each
  multiply-by-reciprocal ("magic number") that gcc emits for a division by a constant marked with its
  divisor (`# div 9`), the idiom a decompiler recognises so the model can copy `9` instead of learning
  954437177 -> 9.
- `harness`: a `main` that runs the function on fixed inputs and prints its result and every array/struct
  it can touch.
- `infer_declarations`: after the model, a compiler-driven type inference (as PsycheC does for SLaDe): the
  prediction is compiled and, for each unknown type, undeclared identifier, unknown struct member or
  implicitly declared function gcc reports, a declaration is added, until it compiles.
- `slade_data` / `slade_train` / `decompile` / `slade_eval`: the corpus with its own asm+C BPE, training
  of the zoo's `slade-nano` from scratch, and the evaluation (IO accuracy, compile rate with and without
  type inference, edit similarity; per optimisation level).

The stages, one module each, in pipeline order: cgen.py (the C generator), asm.py (compile and normalise),
harness.py (IO tests), types.py (type inference), corpus.py (`slade_data`), model.py (train, decompile, eval).
"""

from .asm import asm_of, compile_asm, divisor_of, normalise_asm, target_of  # noqa: F401
from .cgen import (  # noqa: F401
    ARCHES,
    ARRAY,
    ASM_FLAGS,
    FIELDS,
    GLOBALS,
    HEADERS,
    HELPERS,
    LEVELS,
    NOUNS,
    RUN_FLAGS,
    STRUCTS,
    VERBS,
    Context,
    Param,
    Program,
    random_program,
)
from .corpus import SLADE_SPLIT, SLADE_SPLIT_NUMBERS, slade_data, user_pairs  # noqa: F401
from .harness import build, harness, strip_includes  # noqa: F401
from .model import (  # noqa: F401
    choose,
    decompile,
    decompile_asm,
    defines,
    edit_similarity,
    foreign_globals,
    io_check,
    io_checks,
    recompiled_similarity,
    restore_name,
    slade_eval,
    slade_train,
)
from .types import compile_errors, infer_declarations  # noqa: F401
