"""Entry point of the worker bundle (``python bundle.zip URL SECRET_FILE [FINGERPRINT]``).

Kept to syntax every Python 3 reads, so that a wrong interpreter on the nodes still gets as far as
reporting its version instead of dying on a SyntaxError.
"""

import sys

if sys.version_info < (3, 8):  # noqa: UP036 - the nodes may run anything
    sys.stderr.write(
        "sheepdog worker: Python " + sys.version.split()[0] + " on the nodes is too "
        "old (3.8+ is needed); set python= to a newer interpreter\n"
    )
    sys.exit(3)

from sheepdog_executor.remote.worker import enable_crash_reports, main  # noqa: E402

enable_crash_reports()
sys.exit(main(*sys.argv[1:]))
