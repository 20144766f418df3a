"""Memoize highdicom's IOD lookup, the largest cost of building a SEG or SR from 300 slices.

highdicom (0.28) answers "does SOP class X allow attribute Y?" (``is_attribute_in_iod``)
by walking every module of the IOD in the standard's tables, and asks it once or twice per
source image (is it multi-frame? which plane positions?): about 6 ms a call on a loaded CPU,
3.6 s of the 6.5 s an uncompressed BINARY SEG of 300 slices took, and part of the SR's
evidence references too. The answer depends only on those tables, shipped with highdicom and
read once per process, so it is memoized here.

:func:`install` is idempotent and is called when :mod:`service.results.seg` is imported
(:mod:`service.results.sr` imports it). The objects are still built only by highdicom's
constructors; a highdicom without the function (renamed in a later release) is left alone and
merely slower, never wrong.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_MODULES = ("highdicom._standard_utils", "highdicom.base", "highdicom.sr.content")
"""Where highdicom refers to ``is_attribute_in_iod``: its home and the modules that
imported the name (each holds its own reference)."""
_MARK = "_cspine_memoized"


def _memoized(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str,
               exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid,
                        list(exclude) if exclude is not None else None)

    @functools.wraps(original)
    def lookup(attribute: str, sop_class_uid: str,
               exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(str(attribute), str(sop_class_uid), exclude)

    setattr(lookup, _MARK, True)
    return lookup


def install() -> bool:
    """Replace highdicom's lookup with the memoized one; ``False`` if there is none to wrap."""
    home = importlib.import_module(_MODULES[0])
    original: Any = getattr(home, "is_attribute_in_iod", None)
    if original is None:
        logger.warning("highdicom has no is_attribute_in_iod: result objects build unmemoized")
        return False
    memo = original if getattr(original, _MARK, False) else _memoized(original)
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "is_attribute_in_iod", None) in (original, memo):
            module.is_attribute_in_iod = memo  # type: ignore[attr-defined]
    return True


def warm() -> None:
    """Load the standard's tables highdicom reads on its first SEG or SR (about 0.5 s, 1.7 s
    on a loaded CPU), so a worker process pays it at start and not in its first analysis."""
    install()
    home = importlib.import_module(_MODULES[0])
    for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        function = getattr(home, loader, None)
        if function is not None:
            function()
