"""llama.cpp as a batching engine: many sequences in one llama.cpp context, through llama-cpp-python's batch API.

llama.cpp keeps the keys and values of every sequence in one KV cache (`kv_unified`): a cell belongs to the
sequence ids it was decoded for. One `llama_decode` call takes tokens of different sequences at their own
positions, so the rows of a continuous batch decode together, a finished sequence's cells are freed with
`llama_memory_seq_rm`, and a prompt decoded once is shared by another sequence with `llama_memory_seq_cp`
(best-of-N samples start from it without running it again).

Prefix caching: the context remembers the tokens each live sequence holds, so a new prompt that begins like one
of them (the chat template and system prompt every request of a server shares, a kept prefill of the batching
engine) copies those cells and decodes only the rest. Prompts that arrive together share with each other too:
the first of a group is decoded, the others copy its prefix and decode their own tails in a second call.

`Sequences` gives this the interface of `generate.CachedLM` (prefill, step, select, copy_rows, merge), so the one
continuous-batching engine (`batching.py`) and the one decode loop (`generate.decode_tokens`) run llama.cpp exactly
as they run torch: same sampling, same stop handling. llama.cpp only computes logits.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from slmkit.errors import SlmError

KV_CELLS = 32_768  # KV cache positions shared by the sequences of continuous batching (~0.75 GB for SmolLM2-135M)
N_BATCH = 512  # tokens per llama_decode call; longer prefills are split
MIN_SHARED = 8  # a common prefix shorter than this is decoded again rather than copied


_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it for as long as the process lives


def quiet(lc) -> None:
    """Keep llama.cpp's log lines (loading details, a note that the shared KV cache is longer than the training
    context) out of the terminal; a failure is reported by the error raised here, not by its log."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaContext:
    """A GGUF model and one context for up to `n_seq` sequences sharing `n_cells` KV cells."""

    def __init__(self, gguf: Path, *, n_seq: int, n_cells: int, threads: int | None = None):
        import llama_cpp as lc

        quiet(lc)
        self.lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise SlmError(f"llama.cpp cannot load {gguf}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_cells, N_BATCH, N_BATCH
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise SlmError(f"llama.cpp cannot make a context of {n_cells} cells for {n_seq} sequences")
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_seq, self.n_cells = n_seq, lc.llama_n_ctx(self.ctx)
        self.batch = lc.llama_batch_init(N_BATCH, 0, 1)
        self.free = list(range(n_seq - 1, -1, -1))  # sequence ids not in use
        self.history: dict[int, list[int]] = {}  # live sequence id -> the tokens its cells hold, in order
        self.decoded = 0  # tokens run through the model so far (prefix caching keeps this down)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit llama_cpp may already be torn down
            pass

    # sequence ids -----------------------------------------------------------------------------------------

    def take(self) -> int:
        if not self.free:
            raise SlmError(f"llama.cpp context has no free sequence (all {self.n_seq} in use)")
        seq = self.free.pop()
        self.history[seq] = []
        return seq

    def release(self, seq: int) -> None:
        if self.ctx:
            self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.history.pop(seq, None)
            self.free.append(seq)

    def copy(self, seq: int, into: int | None = None, length: int | None = None) -> int:
        """A sequence (`into`, else a new one) sharing the cells of `seq`'s first `length` tokens (all by default);
        no keys or values are copied."""
        twin = self.take() if into is None else into
        length = len(self.history[seq]) if length is None else length
        self.lc.llama_memory_seq_cp(self.memory, seq, twin, 0, length)
        self.history[twin] = self.history[seq][:length]
        return twin

    # decoding ---------------------------------------------------------------------------------------------

    def decode(self, rows: list[tuple[int, list[int], int]], keep: int = 1):
        """Append tokens to sequences: `rows` is (seq, tokens, position of the first). Returns the logits after
        each row's last `keep` tokens, a float32 tensor (rows, keep, vocab)."""
        import numpy as np
        import torch

        lc, batch = self.lc, self.batch
        if any(len(tokens) < keep for _, tokens, _ in rows):
            raise SlmError(f"cannot keep {keep} positions' logits of a row with fewer tokens")
        out = np.empty((len(rows) * keep, self.n_vocab), dtype=np.float32)
        items = [(r * keep + k - (len(tokens) - keep), seq, token, pos + k, k >= len(tokens) - keep)
                 for r, (seq, tokens, pos) in enumerate(rows) for k, token in enumerate(tokens)]
        for start in range(0, len(items), N_BATCH):
            chunk = items[start:start + N_BATCH]
            batch.n_tokens = len(chunk)
            wanted = []
            for i, (slot, seq, token, pos, output) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = output
                if output:
                    wanted.append(slot)
            status = lc.llama_decode(self.ctx, batch)
            if status != 0:
                raise SlmError(f"llama.cpp could not decode ({'no free KV cells' if status == 1 else status}): "
                               f"{self.n_cells} cells shared by the running sequences")
            self.decoded += len(chunk)
            if wanted:
                logits = ctypes.cast(lc.llama_get_logits(self.ctx), ctypes.POINTER(ctypes.c_float))
                out[wanted] = np.ctypeslib.as_array(logits, shape=(len(wanted), self.n_vocab))
        for seq, tokens, pos in rows:
            self.history[seq][pos:] = tokens
        return torch.from_numpy(out).view(len(rows), keep, self.n_vocab)


def longest_prefix(tokens: list[int], candidates: dict, limit: int) -> tuple[object, int]:
    """The candidate (key -> token list) sharing the longest prefix with `tokens`, and that prefix's length (at most
    `limit`); (None, 0) when none shares a token."""
    best, best_n = None, 0
    for key, seen in candidates.items():
        n = 0
        for x, y in zip(seen, tokens[:limit], strict=False):
            if x != y:
                break
            n += 1
        if n > best_n:
            best, best_n = key, n
    return best, best_n


class Sequences:
    """`generate.CachedLM`'s interface over llama.cpp sequences: row i of the batch is sequence `seqs[i]`, which
    holds `lengths[i]` tokens. Rows that leave (`select`) or a dropped `Sequences` free their sequences."""

    def __init__(self, ctx: LlamaContext, input_ids, attention_mask):
        self.ctx = ctx
        self.prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        self.seqs: list[int] = []
        self.lengths: list[int] = []

    @property
    def batch(self) -> int:
        return len(self.seqs)

    def prefill(self, input_ids=None, keep: int = 1):
        """Decode the prompts given at construction (their padding dropped); the last `keep` positions' logits
        (rows, keep, vocab). A prompt starts from a copy of the longest prefix it shares with a live sequence or
        with a prompt of this group decoded first (see the module docstring)."""
        return self._prefill_beside([], keep)[1]

    def step(self, ids, keep: int | None = None):
        """Append `ids` (rows, k) and return the last `keep` (default k) positions' logits (rows, keep, vocab)."""
        rows = ids.tolist()
        logits = self.ctx.decode(list(zip(self.seqs, rows, self.lengths, strict=True)), keep or ids.shape[1])
        self.lengths = [n + len(r) for n, r in zip(self.lengths, rows, strict=True)]
        return logits

    def step_joining(self, ids, joining: Sequences):
        """`step(ids)` (one token per row) and `joining.prefill()` in one llama_decode call, so rows joining a
        running batch do not hold it up for a call of their own: (rows' logits (rows, vocab), joining prompts'
        last logits (prompts, vocab))."""
        rows = [(seq, [token], n) for seq, token, n in zip(self.seqs, ids[:, -1].tolist(), self.lengths, strict=True)]
        logits, first = joining._prefill_beside(rows, 1)
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1], first[:, -1]

    def _prefill_beside(self, others: list, keep: int):
        """Prefill this group's prompts, decoding its first round in the same call as `others` (rows of other
        sequences): (others' logits, prompts' logits), each (rows, keep, vocab)."""
        import torch

        ctx = self.ctx
        live = dict(ctx.history)  # what the context holds before this group takes its sequences
        self.seqs = [ctx.take() for _ in self.prompts]
        self.lengths = [len(p) for p in self.prompts]
        first, second = [], []  # (row, source sequence, shared length), decoded in the first / a second call
        for row, prompt in enumerate(self.prompts):
            limit = len(prompt) - keep  # the last `keep` positions are decoded to give their logits
            source, shared = longest_prefix(prompt, live, limit)
            # a prompt of this group decoded in the first call may share more
            sibling, more = longest_prefix(prompt, {self.seqs[r]: self.prompts[r] for r, _, _ in first}, limit)
            if more > shared and more >= MIN_SHARED:
                second.append((row, sibling, more))
            else:
                first.append((row, source, shared if shared >= MIN_SHARED else 0))
        logits = [None] * len(self.prompts)

        def run(group: list, beside: list):
            """Copy each row's shared prefix, decode the tails (after `beside`'s rows); `beside`'s logits."""
            for row, source, shared in group:
                if shared:
                    ctx.copy(source, into=self.seqs[row], length=shared)
            out = ctx.decode(beside + [(self.seqs[row], self.prompts[row][shared:], shared)
                                       for row, _, shared in group], keep)
            for (row, _, _), row_logits in zip(group, out[len(beside):], strict=True):
                logits[row] = row_logits
            return out[:len(beside)]

        others_logits = run(first, others)  # never empty: the group's first prompt is always here
        if second:
            run(second, [])
        return others_logits, torch.stack(logits)

    def select(self, rows) -> None:
        rows = [int(r) for r in rows]
        for r in set(range(self.batch)) - set(rows):
            self.ctx.release(self.seqs[r])
        self.seqs, self.lengths = [self.seqs[r] for r in rows], [self.lengths[r] for r in rows]

    def copy_rows(self, rows) -> Sequences:
        twin = Sequences.__new__(Sequences)
        twin.ctx, twin.prompts = self.ctx, []
        twin.seqs = [self.ctx.copy(self.seqs[int(r)]) for r in rows]
        twin.lengths = [self.lengths[int(r)] for r in rows]
        return twin

    def merge(self, other: Sequences) -> None:
        """Append copies of `other`'s rows (it keeps its own, as `CachedLM.merge` leaves the other cache as it is)."""
        copied = other.copy_rows(range(other.batch))
        self.seqs, self.lengths = self.seqs + copied.seqs, self.lengths + copied.lengths
        copied.seqs = []

    def __del__(self):
        try:
            for seq in getattr(self, "seqs", []):
                self.ctx.release(seq)
        except Exception:  # noqa: BLE001 - at interpreter exit llama_cpp may already be torn down
            pass
        self.seqs = []
