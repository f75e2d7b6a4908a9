"""`python -m segment.cli ...`: the same commands as the `segment` entry point."""

from segment.cli import app

app(prog_name="segment")
