"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class BnfoldError(Exception):
    """A problem with the user's input or request (bad file, bad option), not a bug in bnfold."""
