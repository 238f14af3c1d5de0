"""The hooks: memdec calls them to learn what this plugin provides (light imports only)."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_combiners():
    from memdec_plugin_example.combiner import Product

    return [Product]


@hookimpl
def memdec_register_retrievers():
    from memdec_plugin_example.retriever import NumpyExact

    return [NumpyExact]


@hookimpl
def memdec_register_memory_models():
    from memdec_plugin_example.memory import Unigram

    return [Unigram]
