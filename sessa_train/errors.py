"""The project's own error types: input that cannot be used, reported as one line.

Command-line entry points print ``<prog>: error: <message>`` and exit 2 for these only; any
other exception is a bug of ours and keeps its traceback. Messages name the bad value and what
would be valid. They derive from ValueError, so library callers may catch them as such.
"""


class SessaError(ValueError):
    """Input that cannot be used."""


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


def argument_parser(**kwargs):
    """An ``argparse.ArgumentParser`` whose errors are one line (``prog: error: message``, status
    2) without the usage block, as every other error of the command-line tools is."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            self.exit(2, f"{self.prog}: error: {message}\n")

    return Parser(**kwargs)
