"""Store: what memdec keeps on disk. Disk faults as one line, the cache folder and its locks,
artifact folders (manifests, atomic writes, content keys) and the cache's listing and cleaning.

Imports the layers below it: components, runtime, contracts.
"""
