"""The ``d2prune`` command line: ``d2prune prune|eval|finetune|attention MODEL ...``.

The paper repository's flag names (``--prune_method``, ``--sparsity_ratio``, ...) are accepted as
aliases so its scripts run unchanged. One module per subcommand; the method options are generated
from the method config dataclasses (``method_options``).
"""

from d2prune.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
