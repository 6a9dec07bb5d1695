"""Run as `python -m engine.cli`: the `zopro` command."""

from engine.cli.app import main

main()
