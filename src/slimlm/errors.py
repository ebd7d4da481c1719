"""User-facing errors: one line that says what to do. The CLI prints them without a traceback."""
from __future__ import annotations


class SlimlmError(Exception):
    """An input problem the user can fix; the message is shown as-is, on one line."""


class ConfigError(SlimlmError, ValueError):
    """A configuration value is out of range or inconsistent."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during work that kept what it had done (a training checkpoint); the message says where."""
