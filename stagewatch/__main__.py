"""`python -m stagewatch` runs the command line."""

import sys

from stagewatch.cli import main

sys.exit(main())
