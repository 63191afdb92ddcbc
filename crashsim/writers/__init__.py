"""Finding writer plugins: built-ins, the ``crashsim.writers`` entry points, or ``pkg.mod:Class``."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

BUILTIN = {
    "vhdx": "crashsim.writers.vhdx.writer:VhdxWriter",
    "vhdx-qemu": "crashsim.writers.vhdx.variants:VhdxQemuWriter",
    "vhdx-2013": "crashsim.writers.vhdx.variants:Vhdx2013Writer",
}


class WriterNotFound(Exception):
    """The scenario names a writer that cannot be loaded; the message says why."""


def available() -> dict[str, str]:
    """kind -> 'module:Class' for every writer this installation knows."""
    found = dict(BUILTIN)
    for ep in entry_points(group="crashsim.writers"):
        found.setdefault(ep.name, ep.value)
    return found


def load_writer_class(kind: str) -> Any:
    target = available().get(kind, kind if ":" in kind else None)
    if target is None:
        names = ", ".join(sorted(available()))
        raise WriterNotFound(f"unknown writer {kind!r}; known writers: {names}, "
                             f"or give 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of a plugin is the user's to fix
        raise WriterNotFound(f"writer {kind!r}: cannot import {module_name!r}: "
                             f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise WriterNotFound(f"writer {kind!r}: module {module_name!r} has no {attr!r}")
    return cls
