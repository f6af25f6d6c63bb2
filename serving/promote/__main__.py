"""``python -m serving.promote``."""

import sys

from serving.promote.cli import main

sys.exit(main())
