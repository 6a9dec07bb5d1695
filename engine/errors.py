"""The exceptions that end a run, shared by the loop and the methods (which must not import the loop)."""

from __future__ import annotations


class StopRun(Exception):
    """Training stopped on request (control `stop`, SIGINT, SIGTERM, SIGHUP) after a checkpoint."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TrainingFailed(RuntimeError):
    """Training could not go on (for example a non-finite loss); the message is for the user."""
