"""`python -m avq` runs the `avq` command line."""

import sys

from .cli import main

sys.exit(main())
