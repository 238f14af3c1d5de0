"""Registers the ``rag`` method and its text retrievers, ``bm25`` and ``dense``."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_rag.method import Rag

    return [Rag]


@hookimpl
def memdec_register_retrievers():
    from memdec_rag.retrievers import Bm25Retriever, DenseRetriever

    return [Bm25Retriever, DenseRetriever]
