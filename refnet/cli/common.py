"""What every verb of the command line shares: the exit codes and the --dtype choice."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def dtypes(choice):
    """--dtype float32 | float64 | all -> the list of dtype names."""
    return ["float32", "float64"] if choice == "all" else [choice]
