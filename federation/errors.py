"""User-facing configuration errors (torch-free, so the CLI can import them cheaply)."""


class ConfigError(ValueError):
    """A configuration value that is missing, mistyped or out of range; the message names it."""


class TaskError(ValueError):
    """A task reference that cannot be loaded; the message says what to fix."""
