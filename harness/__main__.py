"""`python -m wsolbench` is the `wsolbench` command."""
import sys

from wsolbench.cli import main

sys.exit(main())
