"""The faiss retriever on a GPU (``retriever=faiss-gpu``): the same index, trained, filled and
searched on this rank's GPU, written and read as the CPU retriever's files.

It needs a faiss build with GPU support, which replaces faiss-cpu (both are the ``faiss``
module): ``pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12``. Under a launcher each
rank searches its own GPU (``cuda:LOCAL_RANK``, or ``--device cuda:N``), holding the whole index:
with 64-byte PQ codes 10M keys are 0.7 GB. faiss's cloner moves the inverted file and its codes
to the GPU and keeps an OPQ rotation (``auto`` above 2M keys) on the host; an index type it cannot
move is refused in one line.

faiss's GPU search has returned neighbours out of distance order (the cuVS bug); the faiss
retriever's search, which this one runs, sorts any row out of order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from memdec_core.errors import ConfigError
from memdec_knn.index import FaissRetriever, _faiss_message

INSTALL = "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"


class FaissGpuRetriever(FaissRetriever):
    """faiss on this rank's GPU (needs faiss-gpu); the faiss retriever's factories and files, in GPU memory."""

    name = "faiss-gpu"

    @dataclass
    class Config(FaissRetriever.Config):
        def __post_init__(self):
            super().__post_init__()
            if self.on_disk:
                raise ConfigError("faiss-gpu holds the index in GPU memory: on_disk is the faiss retriever's "
                                  "(use an IVF factory with PQ codes, 64 bytes a key)")
            if self.batched_search:
                raise ConfigError("faiss-gpu searches a batch of queries at once already: batched_search is "
                                  "the faiss retriever's")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.gpu = gpu_number()  # refused here, before any work, on a machine without one

    def _placed(self, index):
        """The CPU index moved to the GPU: trained (k-means), filled and searched there."""
        import faiss

        options = faiss.GpuClonerOptions()
        options.useFloat16 = "PQ" in self.factory  # 64-byte codes need fp16 lookup tables in shared memory
        try:
            return faiss.index_cpu_to_gpu(_resources(), self.gpu, index, options)
        except RuntimeError as error:
            raise ConfigError(f"faiss-gpu cannot place index {self.factory!r} on GPU {self.gpu}: "
                              f"{_faiss_message(error)}") from error

    def _on_cpu(self, index):
        import faiss

        return faiss.index_gpu_to_cpu(index)

    def _read_flags(self) -> int:
        return 0  # read whole: the index is copied to the GPU, and a memory-mapped one cannot be

    def _set_nprobe(self) -> None:
        import faiss

        if "IVF" in self.factory:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.config.nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return super().search(queries, k)
        except RuntimeError as error:  # e.g. k above the GPU's selection limit (2,048)
            raise ConfigError(f"faiss-gpu search for k = {k} failed: {_faiss_message(error)}") from error

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search(queries, k)  # the GPU already scans a batch's queries together


def gpu_number() -> int:
    """The GPU faiss uses in this process: ``--device cuda:N``, else the launcher's local rank."""
    import faiss

    from memdec_core.runtime.distributed import world

    if not hasattr(faiss, "StandardGpuResources"):
        raise ConfigError(f"retriever faiss-gpu: the installed faiss has no GPU support; {INSTALL}")
    count = faiss.get_num_gpus()
    if count < 1:
        raise ConfigError("retriever faiss-gpu: faiss sees no GPU on this machine; use retriever faiss")
    device = os.environ.get("MEMDEC_DEVICE", "").strip()
    if device and not device.startswith("cuda"):
        raise ConfigError(f"retriever faiss-gpu with --device {device}: use retriever faiss, or a cuda device")
    number = int(device.partition(":")[2] or 0) if device.startswith("cuda:") else world().local_rank
    if number >= count:
        raise ConfigError(f"retriever faiss-gpu: GPU {number} asked for, faiss sees {count}")
    return number


_RESOURCES: list = []


def _resources():
    """One set of GPU resources (streams, scratch memory) per process, as faiss recommends."""
    import faiss

    if not _RESOURCES:
        _RESOURCES.append(faiss.StandardGpuResources())
    return _RESOURCES[0]
