"""The headless command line `zopro` (app, with its consoles in output and its option choices in choices),
and what its commands run: training with a live progress line (runner), comparisons (compare), sweeps
(sweep) and benchmarks (bench)."""


def main() -> None:
    """The `zopro` console script (pyproject: engine.cli:main)."""
    from engine.cli.app import main as run_app

    run_app()
