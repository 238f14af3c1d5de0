"""One Domain class per folder under ``data/``: ``{train,valid,test}.jsonl.gz`` and ``meta.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memdec_core.errors import ConfigError, DataError
from memdec_core.inputs.data import read_documents
from memdec_core.interfaces import SPLITS, Domain, setting

DATA = Path(__file__).parent / "data"
SOURCES = ("package", "hub")


@dataclass
class PackConfig:
    source: str = setting("package", "package: the shipped sample; hub: the paper-scale dataset on the Hugging "
                                     "Face hub, streamed once into a local snapshot (needs network and "
                                     "`pip install 'memdec[hub]'`)")

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
        tokens = token_counts(cls)
        return {**super().info(), "splits": {split: {"documents": meta["documents"][split],
                                                     "words": meta["words"][split],
                                   **({"tokens": tokens["counts"][split]} if tokens else {})}
                           for split in SPLITS},
                **({"tokens_counted_with": tokens["model"]} if tokens else {}),
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


def token_counts(domain: type[PackDomain]) -> dict | None:
    """Tokens per split under the default models' tokenizer, counted once and cached.

    None when no default model (the demo family) is installed.
    """
    from memdec_core.components import registry
    from memdec_core.store.artifacts import cached_artifact, content_key

    defaults = [cls for cls in registry.components("models").values() if cls.default]
    if not defaults:
        return None
    model_folder = Path(defaults[0]().path())
    stamp = [(p.name, p.stat().st_size) for p in sorted(domain.folder.iterdir())]
    cache_file = cached_artifact("domain-stats", f"{domain.name}-{content_key(stamp, str(model_folder))}.json")
    if cache_file.is_file():
        return json.loads(cache_file.read_text())
    counts = {"model": defaults[0].name, "counts": _count_tokens(domain(), model_folder)}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(counts))
    return counts


def _count_tokens(domain: PackDomain, model_folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    from memdec_core.inputs.data import tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    return {split: len(tokenize_documents(tokenizer, domain.documents(split))) for split in SPLITS}
