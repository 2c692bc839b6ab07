"""`python -m mindformers_dsv3.planner CONFIG.yaml ...`: the dsv3-plan command."""
import sys

from mindformers_dsv3.planner.cli import main

sys.exit(main())
