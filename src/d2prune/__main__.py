"""``python -m d2prune`` (and ``torchrun -m d2prune``) run the CLI."""

import sys

from d2prune.cli import main

sys.exit(main())
