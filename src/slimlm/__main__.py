"""`python -m slimlm ...`: the same command line, for launchers that run a module
(`torchrun --nproc-per-node 2 -m slimlm train ...`, `accelerate launch -m slimlm train ...`)."""
import sys

from .cli import main

sys.exit(main())
