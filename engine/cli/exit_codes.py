"""The exit codes of `zopro`: one place, so every command and the scripts that call them agree."""

EXIT_OK = 0
EXIT_FAILED = 1  # training failed, or a guard (policy.max_kl) stopped it
EXIT_BAD_INPUT = 2  # a recipe, a path or an option the user can fix
EXIT_HANGUP = 129  # SIGHUP: the terminal went away; the run stopped after a checkpoint
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM

EXIT_BY_SIGNAL = {
    "SIGHUP": EXIT_HANGUP,
    "SIGINT": EXIT_INTERRUPTED,
    "SIGTERM": EXIT_TERMINATED,
}  # by signal name
