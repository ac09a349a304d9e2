"""`python -m sftune ...` is the same as the `sftune` command."""

import sys

from sftune.cli import main

sys.exit(main())
