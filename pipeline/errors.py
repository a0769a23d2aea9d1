"""Errors a user can act on. Scripts print their message on one line and exit non-zero."""


class QuickFixError(Exception):
    """Base class: a problem with the user's inputs, reported without a traceback."""

    exit_code = 2


class CheckpointError(QuickFixError):
    """The checkpoint cannot be read, is not trusted, or does not hold the expected weights."""


class ArchitectureError(QuickFixError):
    """The model architecture cannot be built or does not match the checkpoint."""


class DataError(QuickFixError):
    """The image tree, split list or class order is unusable."""


class StoreError(QuickFixError):
    """The feature store is missing, incomplete, or belongs to other inputs."""


class SetupError(QuickFixError):
    """This machine cannot run what was asked: a library, driver or device does not work."""
