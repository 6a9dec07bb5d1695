"""Jobs: the work that starts runs in other processes and keeps track of them, on top of the run-directory
contract. The queue (a detached worker that runs recipes one after another), sweeps (a grid of runs, their
folders, states and summaries) and the one builder of the `python -m engine.cli ...` command line. Imports
neither torch nor textual: the TUI uses it as it is."""
