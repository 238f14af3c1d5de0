"""One Domain class per folder under ``data/``: ``{train,valid,test}.jsonl.gz`` and ``meta.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memdec_core.data import read_documents
from memdec_core.errors import ConfigError, DataError
from memdec_core.interfaces import SPLITS, Domain

DATA = Path(__file__).parent / "data"
SOURCES = ("package", "hub")


@dataclass
class PackConfig:
    source: str = "package"  # "package": the shipped sample; "hub": the paper-scale dataset online

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"domain source must be one of {', '.join(SOURCES)}, got {self.source!r}")


class PackDomain(Domain):
    """Base of the shipped packs; subclasses only set ``folder``."""

    Config = PackConfig
    folder: ClassVar[Path]

    @classmethod
    def meta(cls) -> dict:
        return json.loads((cls.folder / "meta.json").read_text())

    def documents(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
        if self.config.source == "hub":
            from memdec_domains.hub import hub_documents

            return hub_documents(self.name, self.meta()["hub_source"], split)
        return read_documents(self.folder / f"{split}.jsonl.gz")

    @classmethod
    def info(cls) -> dict:
        meta = cls.meta()
        return {"splits": {split: {"documents": meta["documents"][split], "words": meta["words"][split]}
                           for split in SPLITS},
                "source": ", ".join(f"{s['package']}=={s['version']}" for s in meta["sources"]),
                "hub_source": meta["hub_source"]["dataset"]}


def pack_domains() -> list[type[Domain]]:
    """A Domain subclass for every pack folder, named after the folder."""
    domains = []
    for folder in sorted(path for path in DATA.iterdir() if (path / "meta.json").is_file()):
        description = json.loads((folder / "meta.json").read_text())["description"]
        domains.append(type(f"{folder.name.capitalize()}Domain", (PackDomain,),
                            {"name": folder.name, "folder": folder, "__doc__": description,
                             "source": "shipped sample (see DATA_LICENSES.md)"}))
    return domains
