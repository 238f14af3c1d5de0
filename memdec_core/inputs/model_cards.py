"""Model cards: the README.md every artifact carries, so it explains itself here and on the hub,
and what memdec reads of a base model's own card and name (its hub id, its licence).

A card's YAML front matter is the hub's model-card metadata: ``library_name: memdec``, tags, and
for a base on the hub its id and licence. huggingface_hub's ``ModelCard`` writes and reads it.
"""

from __future__ import annotations

from pathlib import Path

from memdec_core import __version__
from memdec_core.components import registry


def write_readme(folder: Path, title: str, lines: list[str], *, tags: tuple[str, ...] = (),
                 base: str | None = None, domain: str | None = None) -> None:
    """A short model card so an artifact explains itself, here and on the Hugging Face hub.

    Its YAML front matter is the hub's model-card metadata (:func:`model_card_data`), written by
    huggingface_hub's ``ModelCard`` so the hub reads back exactly what memdec meant.
    """
    from huggingface_hub import ModelCard

    metadata = model_card_data(tags, base, domain).to_yaml()
    body = "\n".join(lines)
    ModelCard(f"---\n{metadata}\n---\n\n# {title}\n\nMade by memdec {__version__}.\n\n{body}\n").save(
        Path(folder) / "README.md")


def model_card_data(tags: tuple[str, ...] = (), base: str | None = None, domain: str | None = None):
    """A card's front matter as huggingface_hub's ``ModelCardData``: ``library_name: memdec``,
    ``tags`` (the artifact's kinds and its ``domain``), and, for a ``base`` model that is a hub
    id, that id as ``base_model`` and the base's own ``license`` when its card is at hand."""
    from huggingface_hub import ModelCardData

    return ModelCardData(library_name="memdec",
                         tags=list(dict.fromkeys(["memdec", *tags, *([domain] if domain else [])])),
                         base_model=hub_id(base) if base else None,
                         license=model_license(base) if base else None)


def read_front_matter(text: str) -> dict:
    """The front matter of a model card as huggingface_hub reads it (``{}`` when it has none or it
    does not parse)."""
    import yaml
    from huggingface_hub import ModelCard

    if not text.lstrip().startswith("---"):
        return {}  # no metadata block (ModelCard would log a warning for it)
    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except (yaml.YAMLError, ValueError, TypeError):  # broken YAML, or a block that is not a mapping
        return {}


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
