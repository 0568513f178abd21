"""User-facing errors: the entry scripts print these as one sentence and exit non-zero (no traceback)."""


class RunError(Exception):
  """A problem with the run's inputs or state that the user must fix (config, data, checkpoint, NaN)."""


class ConfigError(RunError):
  """An invalid or unknown config value."""


class CheckpointError(RunError):
  """A checkpoint that is missing, unreadable or incompatible with the config."""


class NonFiniteLossError(RunError):
  """The training loss became NaN or Inf."""
