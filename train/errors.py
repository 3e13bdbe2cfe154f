"""Errors a user can cause. Scripts print `error: <message>` for these and exit 2; anything else is a bug."""


class UserError(Exception):
    """Base class: bad input from the user (config, CLI, data, checkpoint). Message is one line."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
