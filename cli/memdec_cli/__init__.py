"""The ``memdec`` command line: thin commands over ``memdec_core.api``."""
