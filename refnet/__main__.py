import sys

from refnet.cli import main

sys.exit(main())
