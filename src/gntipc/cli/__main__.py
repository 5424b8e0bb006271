"""``python -m gntipc.cli``: the ``gntipc`` command."""

import sys

from . import main

sys.exit(main())
