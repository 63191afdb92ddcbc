"""Exit codes and the input error: what every layer may raise for the CLI to report.

Kept apart from ``cli.py`` so that the pipeline (explore, reports, runner) can say
"bad input" without importing the command line that sits on top of it.
"""

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class InputError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""
