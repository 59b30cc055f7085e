"""The one error type of the training scripts that a user can act on."""


class TrainingError(ValueError):
    """A problem the user can fix (a flag, a checkpoint, the data); the CLI prints it without a traceback."""
