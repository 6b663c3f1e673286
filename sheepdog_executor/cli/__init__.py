"""The ``sheepdog-executor`` command: ``main`` (``cli/main.py``) dispatches to ``doctor`` (``cli/doctor.py``)
and ``cleanup`` (``cli/cleanup.py``); ``cli/common.py`` holds what they share."""

from sheepdog_executor.cli.main import main

__all__ = ["main"]
