"""`python -m splatopt ...`: the `splatopt` command, for environments whose scripts folder is not on PATH
(and `torchrun -m splatopt`)."""

import sys

from splatopt.cli import main

sys.exit(main())
