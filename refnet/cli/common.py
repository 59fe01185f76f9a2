"""What every verb of the command line shares: the exit codes, the --dtype choice and the
positive-integer argument type (--steps, --threads, --nproc)."""
import argparse

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def dtypes(choice):
    """--dtype float32 | float64 | all -> the list of dtype names."""
    return ["float32", "float64"] if choice == "all" else [choice]


def positive_int():
    """An argparse type: an integer >= 1 (a clear one-line error otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
        return value
    return parse
