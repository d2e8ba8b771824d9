"""The project's own error types: input that cannot be used, reported as one line.

Command-line entry points print ``<prog>: error: <message>`` and exit 2 for these only; any
other exception is a bug of ours and keeps its traceback. Messages name the bad value and what
would be valid (a URL's user and password shown as ``***``). They derive from ValueError, so
library callers may catch them as such.
"""

import re

# the user-information part of a URL (``scheme://user:password@host``): never recorded or printed
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def redacted(value):
    """A JSON-like value (dicts, lists, strings) with every string ``redact``-ed."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v) for v in value)
    return value


class SessaError(ValueError):
    """Input that cannot be used. Its message never shows a URL's credentials."""

    def __str__(self) -> str:
        return redact(super().__str__())


class ConfigError(SessaError):
    """A configuration key or value (YAML, override, environment)."""


class DataError(SessaError):
    """Shards, an index or a tokenizer that do not match what the run needs."""


class CheckpointError(SessaError):
    """A checkpoint or export that cannot be read or does not fit this run."""


class LaunchError(SessaError):
    """A launcher argument, hostfile or environment that cannot start the job."""


class TrainError(SessaError):
    """A run that cannot start or go on (batch sizes that do not tile, steps that keep failing)."""


def user_error(prog: str, error: object) -> int:
    """Print the one line a command ends with on bad input (``prog: error: ...``); its exit status, 2."""
    import sys

    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def argument_parser(**kwargs):
    """An ``argparse.ArgumentParser`` whose errors are one line (``prog: error: message``, status
    2) without the usage block, as every other error of the command-line tools is, and whose
    ``--help`` shows every option's default."""
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    kwargs["formatter_class"] = Formatter  # descriptions as written, defaults shown

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            self.exit(2, f"{self.prog}: error: {message}\n")

    return Parser(**kwargs)
