"""The plugin authors' contracts (memdec_core.testing), run over every built-in component.

A new built-in component is picked up here by itself; its settings for a quick run go in SETTINGS.
"""

import pytest

from memdec_core.components import registry
from memdec_core.testing import CombinerContract, DomainContract, MemoryModelContract, MethodContract, RetrieverContract

#: Small settings per component name, so each contract runs in seconds on the tiny fixtures.
QUICK = {
    "knn-datastore": {"k": 8, "temperatures": (3.0, 30.0)},
    "knn-lm": {"k": 8, "temperatures": (3.0,)},
    "memory-decoder": {"epochs": 1, "k": 8, "temperature": 1.0, "batch_size": 4},
    "memdec": {"epochs": 1, "k": 8, "temperature": 1.0, "batch_size": 4},
    "dapt": {"epochs": 1, "lrs": (3e-3,)},
    "lora": {"epochs": 1, "lrs": (3e-3,)},
    "rag": {"passage_tokens": 16, "retrieval_stride": 16},
    "mixture": {"memory": "knn-datastore"},
}
#: Components that need hardware this machine lacks, with the fixture that stands in for it.
STAND_INS = {"faiss-gpu": "fake_gpu_faiss"}
CONTRACTS = {"retrievers": RetrieverContract, "memory-models": MemoryModelContract, "combiners": CombinerContract,
             "methods": MethodContract, "domains": DomainContract}


def _contract_classes():
    for kind, contract in CONTRACTS.items():
        for name, cls in registry.components(kind).items():
            if cls.plugin == "example":  # the example plugin runs the kit in its own suite
                continue
            settings = {key: value for key, value in QUICK.items() if key in (name, "knn-datastore")}
            title = "".join(part.capitalize() for part in f"{kind}-{name}".split("-"))
            body = {"component": name, "settings": settings}
            if name in STAND_INS:
                body["stand_in"] = pytest.fixture(autouse=True)(_stand_in(STAND_INS[name]))
            yield f"Test{title}", type(f"Test{title}", (contract,), body)


def _stand_in(fixture_name: str):
    def stand_in(self, request):
        request.getfixturevalue(fixture_name)
    return stand_in


globals().update(dict(_contract_classes()))
