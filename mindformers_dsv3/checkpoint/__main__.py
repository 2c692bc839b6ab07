"""`python -m mindformers_dsv3.checkpoint` runs the `dsv3-convert` command line."""
import sys

from mindformers_dsv3.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
