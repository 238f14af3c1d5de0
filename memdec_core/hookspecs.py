"""The hooks a memdec plugin can implement. Each registration hook returns a list of classes."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("memdec")
hookimpl = pluggy.HookimplMarker("memdec")


@hookspec
def memdec_register_methods():
    """Return the adaptation methods (subclasses of ``memdec_core.interfaces.Method``)."""


@hookspec
def memdec_register_retrievers():
    """Return retrievers (subclasses of ``Retriever``): vector or text search backends."""


@hookspec
def memdec_register_memory_models():
    """Return memory models (subclasses of ``MemoryModel``) that give next-token log-probs."""


@hookspec
def memdec_register_combiners():
    """Return combiners (subclasses of ``Combiner``) that mix a base and a memory distribution."""


@hookspec
def memdec_register_domains():
    """Return domains (subclasses of ``Domain``): named corpora with train/valid/test splits."""


@hookspec
def memdec_register_models():
    """Return named models (subclasses of ``ModelSource``) that resolve wherever a model is taken."""


@hookspec
def memdec_register_commands(cli):
    """Add click commands or groups to the ``memdec`` command group ``cli``."""
