"""Registers the kNN-LM method, the ``knn-datastore`` memory, the faiss retrievers and ``memdec datastore``."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_knn.method import KnnLM

    return [KnnLM]


@hookimpl
def memdec_register_memory_models():
    from memdec_knn.memory import KnnDatastore

    return [KnnDatastore]


@hookimpl
def memdec_register_retrievers():
    from memdec_knn.gpu_index import FaissGpuRetriever
    from memdec_knn.index import FaissRetriever

    return [FaissRetriever, FaissGpuRetriever]


@hookimpl
def memdec_register_commands(cli):
    from memdec_knn.commands import datastore

    cli.add_command(datastore)
