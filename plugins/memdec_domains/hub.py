"""``--source hub``: the paper-scale dataset of a domain, from the Hugging Face hub."""

from __future__ import annotations

from memdec_core.errors import DataError

HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def hub_documents(domain: str, hub_source: dict, split: str) -> list[str]:
    """Documents of one split of the hub dataset; offline or without ``datasets``, a clear error."""
    dataset_id = hub_source["dataset"]
    try:
        import datasets
    except ImportError:
        raise DataError(f"domain {domain!r} from the hub needs the datasets package "
                        f"(pip install datasets) and network access to {dataset_id}") from None
    try:
        loaded = datasets.load_dataset(dataset_id, hub_source.get("config"))
    except Exception as error:  # offline, gated or renamed: all end the same way for the user
        raise DataError(f"cannot load {dataset_id} for domain {domain!r} from the hub "
                        f"({type(error).__name__}); without network, use the shipped sample "
                        f"(--source package)") from error
    return _split_texts(loaded, split, dataset_id)


def _split_texts(loaded, split: str, dataset_id: str) -> list[str]:
    if HUB_SPLITS[split] in loaded:
        rows = loaded[HUB_SPLITS[split]]
    else:  # a train-only dataset: a deterministic 98 / 1 / 1 split by row
        rows = loaded["train"].train_test_split(test_size=0.02, seed=0)
        held_out = rows["test"].train_test_split(test_size=0.5, seed=0)
        rows = {"train": rows["train"], "valid": held_out["train"], "test": held_out["test"]}[split]
    column = "text" if "text" in rows.column_names else next(
        (name for name, feature in rows.features.items() if getattr(feature, "dtype", None) == "string"), None)
    if column is None:
        raise DataError(f"{dataset_id} has no text column")
    return [text for text in rows[column] if text and text.strip()]
