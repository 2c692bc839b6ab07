"""`python -m mindformers_dsv3.parallel CONFIG.yaml ...`: the dsv3-plan command."""
import sys

from mindformers_dsv3.parallel.cli import main

sys.exit(main())
