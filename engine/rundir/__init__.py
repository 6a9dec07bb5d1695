"""The run directory, the one contract between the engine and every reader: its layout and the writer
(events, status, checkpoints, the lock), the event schema, control requests, and the reader (tailing,
status, runs) with what every reader derives from it (progress, alerts, shared renderings). Imports neither
torch nor textual: the TUI and `zopro status` use it as it is. Jobs that start runs are `engine.jobs`."""
