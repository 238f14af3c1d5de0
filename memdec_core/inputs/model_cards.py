"""Model cards: the README.md every artifact carries, so it explains itself here and on the hub,
and what memdec reads of a base model's own card and name (its hub id, its licence).

A card's YAML front matter is the hub's model-card metadata: ``library_name: memdec``, tags, and
for a base on the hub its id and licence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memdec_core import __version__
from memdec_core.components import registry


def write_readme(folder: Path, title: str, lines: list[str], *, tags: tuple[str, ...] = (),
                 base: str | None = None, domain: str | None = None) -> None:
    """A short model card so an artifact explains itself, here and on the Hugging Face hub.

    Its YAML front matter is the hub's model-card metadata: ``library_name: memdec``, ``tags``
    (the artifact's kinds and its ``domain``), and, for a ``base`` model that is a hub id, that
    id as ``base_model`` and the base's own ``license`` when its card is at hand.
    """
    body = "\n".join(lines)
    card = model_card_metadata(tags, base, domain)
    (Path(folder) / "README.md").write_text(f"---\n{card}---\n\n# {title}\n\nMade by memdec {__version__}.\n\n"
                                            f"{body}\n", encoding="utf-8")


def model_card_metadata(tags: tuple[str, ...] = (), base: str | None = None, domain: str | None = None) -> str:
    """The YAML of a model card's front matter (without its ``---`` lines)."""
    import yaml

    metadata: dict[str, Any] = {"library_name": "memdec",
                                "tags": list(dict.fromkeys(["memdec", *tags, *([domain] if domain else [])]))}
    if base and hub_id(base):
        metadata["base_model"] = hub_id(base)
    if base and model_license(base):
        metadata["license"] = model_license(base)
    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``{}`` when it has none or it does not parse)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        metadata = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def hub_id(name: str) -> str | None:
    """``name`` when it names a model on the Hugging Face hub: neither a registered name nor a path."""
    if name in registry.components("models") or looks_like_path(name) or Path(name).expanduser().exists():
        return None
    return name


def looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a path: a hub id is "name" or "org/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def model_license(name: str) -> str | None:
    """The ``license`` in the front matter of a model's own card, when a copy of it is at hand
    (a registered or local folder's README.md, or the hub cache's); None otherwise."""
    if name in registry.components("models"):
        card: Path | str | None = Path(registry.get("models", name)().path()) / "README.md"
    elif hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(name, "README.md")
    else:
        path = Path(name).expanduser()
        card = (path.parent if path.suffix == ".gguf" else path) / "README.md"
    if not isinstance(card, (str, Path)) or not Path(card).is_file():
        return None
    stated = read_front_matter(Path(card).read_text(encoding="utf-8", errors="replace")).get("license")
    return str(stated) if stated else None
