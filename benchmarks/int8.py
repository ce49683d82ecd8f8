"""What int8 costs in quality, and why slmkit's int8 is weight-only: perplexity of the embedded SmolLM2-135M on
the same 8,192 tokens of Jane Austen (512-token windows, `slm eval --perplexity austen --tokens 8192 --dtype D`) in
fp32, bf16, int8 weights (`--dtype int8`: bf16 activations) and torch's dynamic quantisation (int8 weights and
int8 activations, `torch.ao.quantization.quantize_dynamic` on every Linear of the fp32 model).

    python benchmarks/int8.py        # ~3 minutes on 2 cores; writes benchmarks/results/int8.json
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from slmkit.evaluate import perplexity
from slmkit.models import load

OUT = Path(__file__).resolve().parent / "results" / "int8.json"
DATA, TOKENS, SEQ_LEN = "austen", 8192, 512


def measure(loaded) -> float:
    return perplexity(loaded, DATA, TOKENS, SEQ_LEN, 4, progress=False)["perplexity"]


def main() -> None:
    arms = {dtype: measure(load(None, dtype=dtype)) for dtype in ("fp32", "bf16", "int8")}
    dynamic = load(None, dtype="fp32")
    dynamic.model = torch.ao.quantization.quantize_dynamic(dynamic.model, {torch.nn.Linear}, dtype=torch.qint8)
    arms["dynamic int8"] = measure(dynamic)
    result = {"model": dynamic.name, "data": DATA, "tokens": TOKENS, "seq_len": SEQ_LEN, "perplexity": arms,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "command": "python benchmarks/int8.py"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(arms, indent=2))


if __name__ == "__main__":
    main()
