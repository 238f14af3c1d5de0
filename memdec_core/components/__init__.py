"""Components: the plugin manager, the registry of components by name, the plan of which
components a run uses with which settings, their identity (what their code and versions are),
combiner files and the generated docs.

Imports only the contracts and the runtime.
"""
