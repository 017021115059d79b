"""The errors a user can fix (a config key, a data file, a checkpoint, a run directory): the
CLI prints their message alone, without a traceback, and exits with code 2."""
from dcluster.checkpoint import CheckpointError
from dcluster.config import ConfigError
from dcluster.data import DataSourceError, TooManyBadImagesError
from dcluster.rundir import RunDirError

USER_ERRORS = (ConfigError, CheckpointError, DataSourceError, TooManyBadImagesError, RunDirError)
