"""Data: the built-in task, preference datasets and the task interface the training reads them through."""
