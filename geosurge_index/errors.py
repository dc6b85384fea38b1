"""Errors a user can act on. The CLI prints these without a traceback."""


class UserError(Exception):
    """Bad input or a bad file: the message names the input and says what is wrong."""


class FormatError(UserError):
    """An on-disk artefact is missing, corrupted, or of a newer format version."""
