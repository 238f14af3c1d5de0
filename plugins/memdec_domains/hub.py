"""``--source hub``: the paper-scale dataset of a domain, streamed once from the Hugging Face hub.

The dataset is streamed row by row (``datasets.load_dataset(..., streaming=True)``) into a local
snapshot, one gzipped JSONL file per split under the cache's ``hub/``, written atomically. Later
runs read the snapshot and never reach the network; nothing of the dataset beyond one row is held
in memory while it downloads. A dataset without its own train, validation and test splits is
split from its train split by a hash of each document's text (98 / 1 / 1), which does not depend
on the order the rows arrive in.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from memdec_core.errors import DataError
from memdec_core.store.cache import HUB_SNAPSHOT_RECORD

#: The dataset's split names for memdec's train / valid / test.
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
#: Bumped when the snapshot's layout or the train-only split rule changes.
SNAPSHOT_FORMAT = 1


def hub_documents(domain: str, hub_source: dict, split: str) -> list[str]:
    """Documents of one split of the hub dataset, from the local snapshot (streamed there once).

    Offline, without ``datasets``, or when the stream breaks: one DataError, and no snapshot left."""
    from memdec_core.inputs.data import read_documents
    from memdec_core.store.cache_dir import entry_lock

    folder = snapshot_folder(hub_source)
    with entry_lock(folder):
        if not (folder / HUB_SNAPSHOT_RECORD).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a damaged snapshot (its record removed): start over
            _download(domain, hub_source, folder)
    return read_documents(folder / f"{split}.jsonl.gz")


def snapshot_folder(hub_source: dict) -> Path:
    """Where the snapshot of a hub dataset (and config) lives; independent of memdec's code version,
    so that upgrading memdec does not download the dataset again."""
    from memdec_core.store.artifacts import cached_artifact

    identity = json.dumps([SNAPSHOT_FORMAT, hub_source["dataset"], hub_source.get("config")])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", hub_source["dataset"]).strip("_")[-60:]
    return cached_artifact("hub", f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}")


def _download(domain: str, hub_source: dict, folder: Path) -> None:
    from memdec_core.runtime.progress import log, progress_bar
    from memdec_core.store.artifacts import atomic_directory

    dataset_id = hub_source["dataset"]
    splits = _open_stream(domain, hub_source)
    log(f"streaming {dataset_id} from the hub into {folder}")
    with atomic_directory(folder) as temporary:
        files = {split: gzip.open(temporary / f"{split}.jsonl.gz", "wt", encoding="utf-8") for split in HUB_SPLITS}
        counts = dict.fromkeys(HUB_SPLITS, 0)
        try:
            with progress_bar(f"streaming {dataset_id}", None, "documents") as advance:
                for split, text in _documents_by_split(splits, dataset_id, domain):
                    files[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    counts[split] += 1
                    advance()
        finally:
            for handle in files.values():
                handle.close()
        if not all(counts.values()):
            empty = ", ".join(split for split, count in counts.items() if not count)
            raise DataError(f"{dataset_id} gave no documents for the {empty} split(s) of domain {domain!r}")
        # Written last: a snapshot without it is not one (memdec cache ls calls it stale).
        record = {"dataset": dataset_id, "config": hub_source.get("config"), "documents": counts}
        (temporary / HUB_SNAPSHOT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log(f"{dataset_id}: " + ", ".join(f"{count:,} {split} documents" for split, count in counts.items()))


def _open_stream(domain: str, hub_source: dict):
    """The dataset's splits as streams (nothing is downloaded yet)."""
    dataset_id = hub_source["dataset"]
    try:
        import datasets
    except ImportError:
        raise DataError(f"domain {domain!r} from the hub needs the datasets package "
                        f"(pip install 'memdec[hub]') and network access to {dataset_id}") from None
    try:
        return datasets.load_dataset(dataset_id, hub_source.get("config"), streaming=True)
    except Exception as error:  # offline, gated or renamed: all end the same way for the user
        raise _unreachable(dataset_id, domain, error) from error


def _unreachable(dataset_id: str, domain: str, error: Exception) -> DataError:
    first_line = (str(error).splitlines() or [""])[0][:200]
    cause = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return DataError(f"cannot load {dataset_id} for domain {domain!r} from the hub ({cause}); "
                     f"without network, use the shipped sample (--source package)")


def _documents_by_split(splits, dataset_id: str, domain: str) -> Iterator[tuple[str, str]]:
    """(memdec split, text) for every non-empty document, in the stream's order."""
    if all(name in splits for name in HUB_SPLITS.values()):
        for split, name in HUB_SPLITS.items():
            for text in _texts(splits[name], dataset_id, domain):
                yield split, text
        return
    if "train" not in splits:
        raise DataError(f"{dataset_id} has neither a train split nor train/validation/test "
                        f"(it has {', '.join(splits) or 'none'})")
    for text in _texts(splits["train"], dataset_id, domain):
        yield split_of(text), text


def split_of(text: str) -> str:
    """The split of a document of a train-only dataset: 98 % train, 1 % valid, 1 % test, by its text."""
    bucket = zlib.crc32(text.encode("utf-8")) % 100
    return "valid" if bucket == 98 else "test" if bucket == 99 else "train"


def _texts(rows: Iterable[dict], dataset_id: str, domain: str) -> Iterator[str]:
    """The text column of each row ("text", else the first string column of the first row)."""
    column = None
    stream = iter(rows)
    while True:
        try:
            row = next(stream)
        except StopIteration:
            return
        except Exception as error:  # the connection dropped mid-stream: the snapshot is not kept
            raise _unreachable(dataset_id, domain, error) from error
        if column is None:
            column = "text" if "text" in row else next((key for key, value in row.items() if isinstance(value, str)),
                                                       None)
            if column is None:
                raise DataError(f"{dataset_id} has no text column (columns: {', '.join(row)})")
        text = row.get(column)
        if isinstance(text, str) and text.strip():
            yield text
