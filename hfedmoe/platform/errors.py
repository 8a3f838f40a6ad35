"""Errors every layer shares (a leaf: the CLI imports it without torch)."""


class ConfigError(ValueError):
    """A configuration value is missing or out of range; the message names the field."""


class Terminated(BaseException):
    """SIGTERM arrived during a run: it ends like on Ctrl-C (KILLED), unwinding callbacks."""


class InjectedFault(RuntimeError):
    """A fault the config asked for (``faults.driver_crash``): the run fails on purpose."""
