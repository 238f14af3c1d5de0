"""Registers the demo models, so ``--base memdec-demo-s`` works anywhere a model is taken."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_models():
    from memdec_zoo.family import demo_models

    return demo_models()
