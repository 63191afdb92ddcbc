"""Finding writer plugins: built-ins, the ``crashsim.writers`` entry points, or ``pkg.mod:Class``.

Whatever a plugin does wrong when it is loaded (it does not import, raises or exits while
importing, names no class, names something that is not a writer) becomes one
``WriterNotFound`` line saying what to fix; nothing a plugin raises escapes as a traceback.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

BUILTIN = {
    "vhdx": "crashsim.writers.vhdx.writer:VhdxWriter",
    "vhdx-qemu": "crashsim.writers.vhdx.variants:VhdxQemuWriter",
    "vhdx-2013": "crashsim.writers.vhdx.variants:Vhdx2013Writer",
}
# What the explorer calls on a writer (crashsim.writers.base.Writer).
WRITER_METHODS = ("format_image", "run", "recover", "view", "check_structure", "probe")


class WriterNotFound(Exception):
    """The scenario names a writer that cannot be loaded; the message says why."""


def available() -> dict[str, str]:
    """kind -> 'module:Class' for every writer this installation knows."""
    found = dict(BUILTIN)
    for ep in entry_points(group="crashsim.writers"):
        found.setdefault(ep.name, ep.value)
    return found


def load_writer_class(kind: str) -> Any:
    known = available()
    target = known.get(kind, kind if ":" in kind else None)
    if target is None:
        names = ", ".join(sorted(known))
        raise WriterNotFound(f"unknown writer {kind!r}; known writers: {names}, "
                             f"or give 'package.module:Class'")
    # the fix differs: a registered name is a broken installation, a path is a typo
    fix = (f"reinstall the package that registers writer {kind!r} (entry point "
           f"{target!r})" if kind in known and kind not in BUILTIN else
           "check the 'package.module:Class' spelling and that the package is installed")
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise WriterNotFound(f"writer {kind!r}: {target!r} is not 'package.module:Class'; "
                             f"{fix}")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a plugin's import-time failure is the user's
        where = _import_failed_at(exc)
        if where is not None:
            inner_fix = (f"install {exc.name!r}, or fix that import" if
                         isinstance(exc, ModuleNotFoundError) else "fix the plugin there")
            raise WriterNotFound(f"writer {kind!r}: {where}: importing "
                                 f"{module_name!r} raised {_one_line(exc)}; "
                                 f"{inner_fix}") from None
        if "/" in module_name or module_name.endswith(".py"):
            fix = ("a file path is not a module name: put the folder that holds the "
                   "package on PYTHONPATH and write 'package.module:Class'")
        raise WriterNotFound(f"writer {kind!r}: cannot import {module_name!r}: "
                             f"{_one_line(exc)}; {fix}") from None
    try:
        cls = getattr(module, attr, None)
    except Exception as exc:  # a module __getattr__ that raises
        raise WriterNotFound(f"writer {kind!r}: {target!r}: {_one_line(exc)}; "
                             f"{fix}") from None
    if cls is None:
        raise WriterNotFound(f"writer {kind!r}: module {module_name!r} has no {attr!r}; "
                             f"{fix}")
    _check_writer_class(kind, target, cls)
    return cls


def _check_writer_class(kind: str, target: str, cls: Any) -> None:
    if not isinstance(cls, type):
        raise WriterNotFound(f"writer {kind!r}: {target!r} is a {type(cls).__name__}, not "
                             f"a writer class; name a class with "
                             f"{', '.join(WRITER_METHODS)} (see crashsim.writers.base)")
    missing = [m for m in WRITER_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise WriterNotFound(f"writer {kind!r}: class {target!r} is not a writer: it has "
                             f"no {', '.join(missing)} (see crashsim.writers.base)")


def _import_failed_at(exc: BaseException) -> str | None:
    """``file:line`` in the plugin's own code where its import failed, or None when it
    never got that far (no such module: the spelling or the installation is at fault)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    where, tb = None, exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith("<") or name in (__file__, importlib.__file__)):
            where = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
