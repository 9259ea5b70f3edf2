"""The one exception type for errors a user can fix.

A library raises `UserError` when a flag, a gin binding, a file, a record or a checkpoint is
wrong in a way the user can correct; its message names the file, line, field or flag and what
would fix it. The entry points print that message as one line and exit with status 2 (the
traceback only with --debug or DISTILL_SBS_DEBUG=1). It subclasses ValueError so that callers
catching ValueError keep working.
"""

from __future__ import annotations

DEBUG_ENV = "DISTILL_SBS_DEBUG"
EXIT_CODE = 2


class UserError(ValueError):
    """An error the user can fix; the message is the whole report (one line)."""
