"""memdec's kit for plugin authors: tiny models, a tiny corpus, an isolated cache."""

pytest_plugins = ["memdec_core.testing"]
