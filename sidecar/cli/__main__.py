"""`python -m sidecar.cli`: the same as the `tombstone-sidecar` command."""

import sys

from sidecar.cli.main import main

sys.exit(main())
