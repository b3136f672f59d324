"""``python -m specmeshctl ...``: the ``specmesh`` command."""

import sys

from specmeshctl.main import main

sys.exit(main())
