"""``python -m mupderive``."""

import sys

from mupderive.cli import main

sys.exit(main())
