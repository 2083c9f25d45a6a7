"""A real-text corpus that this project did not write: Python modules of the installed
environment, where pip vendors older copies of libraries that are also installed on their own
(``pip/_vendor/rich/bar.py`` beside ``rich/bar.py``). Those pairs are genuine near-copies (the
same module a few releases apart); different modules of one package share style, licence
headers and imports but are distinct documents.

The corpus is generated at test time from what is installed; only the hand-made labels
(``data/real_text_labels.json``) are committed.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

PACKAGES = ("colorama", "requests", "urllib3", "idna", "certifi", "rich", "packaging")
MAX_BYTES = 8000  # keeps the test's embedding cost to a few hundred short documents
LABELS = Path(__file__).parent / "data" / "real_text_labels.json"


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def corpus_files(root: Path | None = None) -> dict[str, Path]:
    """id (path relative to site-packages) -> file, for every small module of PACKAGES,
    vendored by pip or installed on its own."""
    root = root or site_packages()
    found: dict[str, Path] = {}
    for base in (root / "pip" / "_vendor", root):
        for package in PACKAGES:
            for path in sorted((base / package).rglob("*.py")):
                if 0 < path.stat().st_size <= MAX_BYTES:
                    found[path.relative_to(root).as_posix()] = path
    return found


def write_corpus(dest: Path) -> tuple[Path, dict[str, str]]:
    """One jsonl shard of {"id", "text"}; returns it and the texts by id."""
    texts = {doc_id: path.read_text(encoding="utf-8") for doc_id, path in corpus_files().items()}
    dest.mkdir(parents=True, exist_ok=True)
    shard = dest / "modules.jsonl"
    with shard.open("w", encoding="utf-8") as fh:
        for doc_id, text in texts.items():
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return shard, texts


def load_labels() -> list[dict]:
    """Pairs judged by reading both files: label 'duplicate' or 'distinct', with a note."""
    return json.loads(LABELS.read_text())["pairs"]
