"""``python -m d2prune`` (and ``torchrun -m d2prune``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
