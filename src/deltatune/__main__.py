"""`python -m deltatune ...` is the `deltatune` command (handy under torchrun)."""

import sys

from deltatune.cli import main

sys.exit(main())
