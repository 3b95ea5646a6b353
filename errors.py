"""The one base class of the errors a user can cause and fix: a bad path, option, config, corpus row, cache or
model folder. The CLI prints such an error as one line (exit code 2); any other exception is a bug and keeps its
traceback.

Every module's own error class (AudioError, ConfigError, ManifestError, CacheError, CheckpointError, EvalError,
...) derives from UserError, so library callers can catch either. UserError is a ValueError, as those classes
were before it existed.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error in what the user gave (its message names the file, row or option and says what to do)."""
