"""`python -m fixedpos ...`: the `fixedpos` command, for environments whose scripts folder is not on PATH
(and `torchrun -m fixedpos`)."""

import sys

from fixedpos.cli import main

sys.exit(main())
