"""``python -m cmdserver.cli``: the console script."""

import sys

from cmdserver.cli import main

sys.exit(main())
