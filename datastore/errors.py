"""User-facing errors shared by every stage.

A `UserError` means the input (a file, a URI, an option) is wrong, not the code. The CLI prints its
message as one line and exits with status 2; the service maps it to an HTTP 4xx with a JSON body.
"""


class UserError(ValueError):
    """Bad input from a user: the message names the input and what would be accepted."""
