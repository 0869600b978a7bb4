"""kpbench's exit codes (README "Command line"): one place for every command."""

EXIT_OK = 0  # success
EXIT_FAILED = 1  # a cell failed, or results could not be written
EXIT_INVALID = 2  # invalid input: one line naming the key or argument, nothing created
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: completed cells kept, status INTERRUPTED
