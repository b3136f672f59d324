"""``python -m specmesh.modelserver``: the same as ``specmesh model-server``."""

import sys

from .cli import main

sys.exit(main())
