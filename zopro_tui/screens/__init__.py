"""Screens of the workbench: runs list, run dashboard, compare, help and the modals."""
