"""Exit codes and the input error: what every layer may raise for the CLI to report.

Kept apart from ``cli.py`` so that the pipeline (explore, reports, runner) can say
"bad input" without importing the command line that sits on top of it.
"""

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class InputError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class PluginError(InputError):
    """A writer plugin broke the protocol (``writers/base.py``): its author's to fix, so
    it is reported like bad input, naming the plugin's own line."""


def defined_at(fn: object) -> str:
    """``file:line`` where a plugin's method is defined: a wrong return value has no
    traceback, so its author is pointed at the method instead."""
    import inspect
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def plugin_line(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback: where it was raised."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
