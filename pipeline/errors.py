"""The one exception type that means "the user can fix this": the CLI prints it as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or configuration: a missing column, an unreadable path, refused credentials, a failed quality floor.

    The message is one line that says what is wrong and what to do. It never contains credentials.
    """
