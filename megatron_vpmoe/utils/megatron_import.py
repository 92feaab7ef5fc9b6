"""Import megatron-core modules without its import-time notices about Transformer Engine/Apex.

megatron-core warns at import when TE/Apex are missing (always, on CPU hosts) even for modules
that never use them, such as the datasets; those notices are noise in every CLI run.
"""

from __future__ import annotations

import importlib
import warnings


def import_megatron(module: str):
    """``importlib.import_module(module)`` with the TE/Apex fallback warnings silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        return importlib.import_module(module)
