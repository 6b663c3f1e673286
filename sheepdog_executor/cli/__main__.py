"""``python -m sheepdog_executor.cli``: the ``sheepdog-executor`` command."""

import sys

from sheepdog_executor.cli.main import main

sys.exit(main())
