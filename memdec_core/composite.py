"""``import memdec_core.composite``: registers memdec's composite model with transformers.

After this import, ``AutoModelForCausalLM.from_pretrained(folder)`` opens a composite folder that
``save_pretrained`` or ``memdec export --base B --memory M`` wrote. The model itself lives in
``memdec_core.engine.composite``; this is the short public path that saved model cards name.
"""

from memdec_core.engine.composite import MemdecConfig, MemdecForCausalLM

__all__ = ["MemdecConfig", "MemdecForCausalLM"]
