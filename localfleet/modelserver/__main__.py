"""``python -m localfleet.modelserver``: the same as ``specmesh model-server``."""

import sys

from .cli import main

sys.exit(main())
