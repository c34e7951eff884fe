"""`python -m cli`: the same commands as `python main.py`."""

import sys

from cli.app import main

sys.exit(main())
