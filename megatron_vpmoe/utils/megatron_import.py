"""Import megatron-core modules without its import-time notices about Transformer Engine/Apex.

megatron-core warns at import when TE/Apex are missing (always, on CPU hosts) even for modules
that never use them, such as the datasets; those notices are noise (``utils/notices.py`` says why).
"""

from __future__ import annotations

import importlib

from megatron_vpmoe.utils.notices import quiet


def import_megatron(module: str):
    """``importlib.import_module(module)`` with the known notices silenced."""
    with quiet():
        return importlib.import_module(module)
