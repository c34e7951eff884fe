"""`python main.py [COMMAND]`: the command line of the `cli` package (`python -m cli` is the same)."""

import sys

from cli.app import main

if __name__ == "__main__":
    sys.exit(main())
