"""`python -m refnet`: the command line (refnet.cli)."""
import sys

try:
    from refnet.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python loads refnet: one line, not a traceback
    print("refnet: interrupted", file=sys.stderr)
    sys.exit(130)  # refnet.cli.common.EXIT_INTERRUPTED (importing it is what was interrupted)

sys.exit(main())
