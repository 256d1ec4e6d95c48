"""The merge job's one user-facing error type."""

from datastore.errors import UserError


class MergeError(UserError):
    """A checkpoint or a merge config is unusable; the message is one line naming the input."""
