"""Widgets of the workbench: the braille chart and the dashboard panels built on it."""
