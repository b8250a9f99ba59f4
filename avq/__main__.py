"""`python -m avq` runs the `avq` command line."""

import sys

from avq.cli import main

sys.exit(main())
