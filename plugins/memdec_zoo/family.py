"""One ModelSource class per shipped model folder under ``models/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from memdec_core.interfaces import ModelSource

MODELS = Path(__file__).parent / "models"


class DemoModel(ModelSource):
    """Base of the shipped demo models; subclasses only set ``folder``."""

    folder: ClassVar[Path]
    default = True  # the demo family is the default set of base models

    def path(self) -> str:
        return str(self.folder)

    @classmethod
    def info(cls) -> dict:
        config = json.loads((cls.folder / "config.json").read_text())
        log_file = cls.folder / "train_log.json"
        log = json.loads(log_file.read_text()) if log_file.exists() else {}
        return {**super().info(), "parameters": log.get("parameters"), "architecture": config.get("model_type"),
                "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
                "vocab_size": config.get("vocab_size"), "path": str(cls.folder),
                "tokenizer_fingerprint": _tokenizer_fingerprint(cls.folder)}


def _tokenizer_fingerprint(folder: Path) -> str:
    from transformers import AutoTokenizer

    from memdec_core.inputs.models import tokenizer_fingerprint

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder))


def demo_models() -> list[type[ModelSource]]:
    """A ModelSource for every model folder, smallest first (folder names sort s < m < l by size)."""
    folders = [path for path in MODELS.iterdir() if (path / "config.json").is_file()] if MODELS.is_dir() else []
    folders.sort(key=lambda path: json.loads((path / "config.json").read_text()).get("hidden_size", 0))
    return [type(f"DemoModel_{folder.name.replace('-', '_')}", (DemoModel,),
                 {"name": folder.name, "folder": folder,
                  "__doc__": f"Demo model {folder.name}: pretrained on the general domain only."})
            for folder in folders]
