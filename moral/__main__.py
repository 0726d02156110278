"""`python -m moral ...` is `python run.py ...` (moral/cli.py)."""

from moral.cli import main

main(prog="python -m moral")
