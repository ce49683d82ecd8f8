"""Write the measured tables into the docs from their sources, so a figure is written once.

    python benchmarks/tables.py           # rewrite the marked tables in README.md and docs/*.md
    python benchmarks/tables.py --check   # exit 1 if a doc differs from its sources (a test runs this)

A table lives between `<!-- NAME:start -->` and `<!-- NAME:end -->`; its source is a JSON file in
benchmarks/results/, a proof's committed figures in docs/results/ (`proof-KEY`), or a dataclass of defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROOF_RESULTS = ROOT / "docs" / "results"  # the proofs' committed figures (`slm proofs --record`)


def engines_table() -> str:
    data = json.loads((RESULTS / "engines.json").read_text())
    lines = [f"Measured in one run on {data['machine']['cpu']} ({data['machine']['threads']} threads); perplexity on "
             f"{data['perplexity_data']}; facts: greedy answers to eight questions carrying the fact torch's carry.",
             "", "| engine, weights | perplexity | vs torch fp32 | facts | max \\|Δlogit\\| vs torch "
             "| max \\|Δlogit\\| alone vs batch | prefill tok/s | decode tok/s, 1 / 4 / 16 sequences |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in data["arms"].items():
        lines.append(f"| {name} | {r['perplexity']:.3f} | {100 * r['perplexity_vs_torch']:+.2f}% | "
                     f"{r['facts_held']}/8 | {r['max_logit_diff_vs_torch']:.3f} | "
                     f"{r['max_logit_diff_alone_vs_batch']:.3f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s_1']:.0f} / {r['decode_tok_s_4']:.0f} / {r['decode_tok_s_16']:.0f} |")
    wrong = [(name, a) for name, r in data["arms"].items() for a in r["answers"] if not a["holds"]]
    for name, a in wrong[:3]:
        lines.append(f"\n{name} to \"{a['question']}\": \"{a['answer'][:80]}\"")
    return "\n".join(lines)


def limits_table() -> str:
    sys.path.insert(0, str(ROOT))
    from slmkit.api import Limits

    beyond = {"max_tokens": "tokens generated when a request gives no `max_tokens`",
              "max_tokens_cap": "400 naming `max_tokens`; also capped to the model's context",
              "max_body_bytes": "413, answered from the `Content-Length` header before the body is read",
              "max_prompts": "400: prompts × `n` completions per request",
              "max_queue": "429 with `Retry-After: 1` (requests waiting for a batch row)",
              "timeout": "504 with code `timeout` (wall-time per request, seconds)",
              "max_connections": "503 with `Retry-After: 1`",
              "read_timeout": "a client silent this long while sending is dropped"}
    lines = ["| flag | default | beyond it |", "|---|---|---|"]
    for f in dataclasses.fields(Limits):
        lines.append(f"| `--{f.name.replace('_', '-')}` | {f.default} | {beyond[f.name]} |")
    return "\n".join(lines)


def load_table() -> str:
    runs = [("torch (`--dtype auto`)", "serve.json"), ("llama.cpp, continuous batching", "serve-llamacpp.json"),
            ("llama.cpp before (one request at a time)", "serve-llamacpp-serial.json")]
    found = {file: json.loads((RESULTS / file).read_text()) for _, file in runs if (RESULTS / file).is_file()}
    repeats = {data.get("repeats", 1) for data in found.values()}
    lines = ["`python benchmarks/serve.py --engine E` (a real `slm serve` process, the openai client streaming over "
             "loopback, 64 tokens per request, 2 requests per client, max batch 16), all in one session; tok/s is "
             f"the median of {'/'.join(map(str, sorted(repeats)))} runs of each level (all runs in brackets). The "
             "engine before this change ran from its own checkout (`--server-path`, commit in the JSON).", "",
             "| engine | clients | tok/s | vs 1 client | first token p50 / p99 (s) | failed | server peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for name, file in runs:
        if file not in found:
            continue
        data = found[file]
        for lv in data["levels"]:
            memory = lv.get("server_memory_kib", {}).get("VmHWM")
            every_run = lv.get("tokens_per_s_runs", [])
            every = f" [{', '.join(map(str, every_run))}]" if len(every_run) > 1 else ""
            lines.append(f"| {name} | {lv['clients']} | {lv['tokens_per_s']}{every} | {lv.get('vs_single_stream')}× | "
                         f"{lv['median_ttft_s']} / {lv.get('p99_ttft_s', '–')} | {lv['failed']} | "
                         f"{f'{memory / 1024:.0f} MiB' if memory else '–'} |")
        if data.get("sigterm_stop_s") is not None:
            lines.append(f"| {name}: SIGTERM after the load | | | | stopped in {data['sigterm_stop_s']} s | | |")
    at16 = {file: next((lv for lv in data["levels"] if lv["clients"] == 16), None) for file, data in found.items()}
    if all(at16.get(f) for f in ("serve.json", "serve-llamacpp.json", "serve-llamacpp-serial.json")):
        new, serial, torch = (at16[f] for f in ("serve-llamacpp.json", "serve-llamacpp-serial.json", "serve.json"))
        worst = min(new.get("tokens_per_s_runs", [new["tokens_per_s"]])) / max(
            serial.get("tokens_per_s_runs", [serial["tokens_per_s"]]))
        ratio = new["tokens_per_s"] / serial["tokens_per_s"]
        lines += ["", f"At 16 clients, llama.cpp with continuous batching gives **{ratio:.2f}×** "
                  f"the aggregate tokens/s of llama.cpp one request at a time (its slowest run against the other's "
                  f"fastest: {worst:.2f}×) and **{new['tokens_per_s'] / torch['tokens_per_s']:.2f}×** the torch "
                  "engine's, in the same session."]
    return "\n".join(lines)


def speed_table() -> str:
    data = json.loads((RESULTS / "generate.json").read_text())
    labels = {"hf_generate_fp32": "HF `generate`, `from_pretrained` defaults (fp32) — the torch peer",
              "torch_fp32": "slmkit torch, fp32", "torch_bf16": "slmkit torch, bf16",
              "torch_int8": "slmkit torch, int8 weights (`--dtype int8`)",
              "llamacpp_engine": "slmkit llama.cpp engine (`--engine llamacpp`, what it runs for the embedded model)",
              "llama_cpp_bare": "bare `llama-cpp-python`, same GGUF — the llama.cpp peer"}
    lines = [f"Measured in one run on {data['cpu']} ({data['threads']} threads, {data['memory_read_GB_s']:.1f} GB/s "
             f"read bandwidth), a {data['prompt_tokens']}-token prompt for prefill, {data['new_tokens']} new tokens:",
             "", "| engine | decode tok/s | prefill tok/s | batch-8 tok/s | % of bandwidth limit |",
             "|---|---|---|---|---|"]
    for name, r in data["engines"].items():
        batch8 = f"{r['batch8_tok_s']:.1f}" if "batch8_tok_s" in r else "–"
        lines.append(f"| {labels.get(name, name)} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {batch8} | "
                     f"{100 * r['fraction_of_limit']:.0f}% |")
    lines += ["", "Ratios in the same run: " + "; ".join(f"{k.replace('_', ' ')} **{v:.2f}×**"
                                                        for k, v in data["ratios"].items()) + "."]
    return "\n".join(lines)


def int8_table() -> str:
    data = json.loads((RESULTS / "int8.json").read_text())
    p = data["perplexity"]
    return (f"Quality of the torch dtypes (`{data['command']}`: `slm eval --perplexity {data['data']} --tokens "
            f"{data['tokens']} --dtype D` on {data['model']}, 512-token windows): fp32 **{p['fp32']:.2f}**, bf16 "
            f"{p['bf16']:.2f}, int8 weights **{p['int8']:.2f}** ({100 * (p['int8'] / p['fp32'] - 1):+.1f}%); "
            f"torch's dynamic quantisation, int8 activations too: **{p['dynamic int8']:.2f}** "
            f"({100 * (p['dynamic int8'] / p['fp32'] - 1):+.0f}%).")


def proof_table(key: str) -> str:
    """A proof's committed claims (docs/results/KEY.json, written by `slm proofs --record KEY`)."""
    from slmkit.proofs import arms_text, interval_text, verdict

    data = json.loads((PROOF_RESULTS / f"{key}.json").read_text())
    source = data.get("source") or {}
    commit = (source.get("commit") or "?")[:10] + (" with uncommitted changes" if source.get("dirty") else "")
    lines = [f"Measured by `{data['ran'] or data['commands'][-1]}` on {data['machine']['cpu']} "
             f"({data['machine']['cores']} cores), {data['measured'][:10]}, source {commit}; "
             f"[docs/results/{key}.json](results/{key}.json):", "",
             "| claim | measured | difference, 95% interval | verdict | over |", "|---|---|---|---|---|"]
    for c in data["claims"]:
        lines.append(f"| {c['claim']} | {arms_text(c)} | {interval_text(c) or '–'} | {verdict(c)} | {c['over']} |")
    if data.get("plot"):
        lines += ["", f"![{data['system']}: the committed figures' plot](results/{data['plot']})"]
    return "\n".join(lines)


def proofs_table() -> str:
    """The README's table of every miniature proof (slmkit.proofs.PROOFS) with its committed claims."""
    from slmkit.proofs import PROOFS, arms_text, interval_text, reference, verdict

    lines = ["| system | the effect, at laptop scale | committed figures (95% interval of the difference) | verdict |",
             "|---|---|---|---|"]
    for p in PROOFS:
        claims = reference(p, PROOF_RESULTS)
        if not claims:
            lines.append(f"| [{p.system}]({p.doc}) | {p.effect} | not recorded yet (earlier single runs, without "
                         f"intervals: [{p.doc.split('/')[-1]}]({p.doc})) | – |")
            continue
        figures = "<br>".join(f"{c['claim']}: {arms_text(c)}"
                              + (f", {interval_text(c)}" if c["difference_interval"] else "") + f" ({c['over']})"
                              for c in claims)
        verdicts = "<br>".join(verdict(c) for c in claims)
        lines.append(f"| [{p.system}]({p.doc}) | {p.effect} | {figures}; [docs/results/{p.key}.json]"
                     f"(docs/results/{p.key}.json) | {verdicts} |")
    return "\n".join(lines)


TABLES = {"engines": engines_table, "limits": limits_table, "load": load_table, "speed": speed_table,
          "evalnums": int8_table, "proofs": proofs_table,
          **{f"proof-{p.stem}": (lambda key=p.stem: proof_table(key))
             for p in sorted(PROOF_RESULTS.glob("*.json"))}}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(f"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(3), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        sys.exit(f"out of date with their sources: {', '.join(map(str, stale))} (run python benchmarks/tables.py)")
    print("\n".join(f"{'stale' if args.check else 'wrote'} {d}" for d in stale) or "docs are up to date")


if __name__ == "__main__":
    main()
