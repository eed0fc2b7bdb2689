"""`python -m node` is the `gleaner` command."""

import sys

from node.cli import main

sys.exit(main())
