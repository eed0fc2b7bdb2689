"""`python -m node` is the `gleaner` command."""

import sys

from node.cli.main import main

sys.exit(main())
