"""``python -m engine``: the engine process, without the ``specmesh`` CLI's imports.

The supervisor and the Helm chart start engines this way: ``specmeshctl`` imports what
only the CLI uses (httpx, rich, the spec diff...), ~3 MB of RSS per engine. It runs
:func:`engine.main.main`, the function ``specmesh engine`` runs, with the same arguments
and settings.
"""

from __future__ import annotations

import sys

from engine.main import main

if __name__ == "__main__":
    sys.exit(main())
