"""The two kinds of exception that are not bugs, as bases the error classes of every layer
derive from.

A leaf module (standard library only): the CLI and the process group classify an exception by
its base class, so they need not import the data layer, checkpoints or the stop protocol to
know how to report it.
"""


class UserError(Exception):
    """An error a user can fix (a config key, a data file, a checkpoint, a run directory): the
    CLI prints its message alone, without a traceback, and exits with code 2."""


class CleanStop(Exception):
    """The run stopped on purpose after saving its state (a stop signal): not a failure, and
    every rank stops together, so the process group can be closed normally."""
