"""The exporter's user-facing error: its message is printed as one line by the CLI."""


class ExportError(Exception):
    """Bad input or a failed export step, with a message meant for the user."""
