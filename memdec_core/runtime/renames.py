"""Keywords that changed name: the former name keeps working, with a DeprecationWarning."""

from __future__ import annotations

import functools
import warnings
from typing import Callable

from memdec_core.errors import ConfigError


def renamed_keywords(**former: str) -> Callable:
    """Let a function take each keyword under its former name too: ``@renamed_keywords(old="new")``."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def accepting_former_names(*args, **kwargs):
            for old, new in former.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise ConfigError(f"{function.__name__}: give {new}= only ({old}= is its former name)")
                warnings.warn(f"{function.__name__}({old}=...) is now {new}=...", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return accepting_former_names

    return decorate
