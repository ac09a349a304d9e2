"""`python -m sftune ...` is the same as the `sftune` command."""

from sftune.cli import entry

entry()
