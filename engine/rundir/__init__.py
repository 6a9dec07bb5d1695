"""The run directory, the one contract between the engine and every reader: the writer (events, status,
checkpoints, the lock), control requests, the reader (tailing, status, runs) and the reports built on it.
Imports neither torch nor textual: the TUI and `zopro status` use it as it is."""
