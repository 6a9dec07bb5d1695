"""The exceptions that end a run, shared by the loop and the methods (which must not import the loop)."""

from __future__ import annotations


class StopRun(Exception):
    """Training stopped on request (control `stop`, SIGINT, SIGTERM, SIGHUP) or by a guard (policy.max_kl)
    after a checkpoint; `failed` marks a guard's stop, which the command line reports with a non-zero exit."""

    def __init__(self, reason: str, failed: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.failed = failed


class TrainingFailed(RuntimeError):
    """Training could not go on (for example a non-finite loss); the message is for the user."""
