"""The built-in preset names, importable without torch (the command line's ``--help`` lists them).

:data:`lxt_plus.engine.plan.PRESETS` is built for exactly these names, in this order (checked when
it is built), and :func:`lxt_plus.list_presets` returns them; nothing else writes them out.
"""

from __future__ import annotations

__all__ = ["PRESET_NAMES"]

PRESET_NAMES = ("attnlrp", "cp-lrp", "ah-lrp", "pa-attnlrp", "pa-ah-lrp", "gradient", "conservative-check")
