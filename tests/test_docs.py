"""Figures in the docs are written from their sources: the measured tables between markers in docs/*.md are
what benchmarks/tables.py makes from benchmarks/results/*.json and the defaults in the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_tables_match_their_sources():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_docs_links_point_at_files():
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, _ in re.findall(r"\]\(([^)#:\s]+)(#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not there"
