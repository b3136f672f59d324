"""``python -m sidecar``: the sidecar process, without the ``specmesh`` CLI's imports.

The supervisor and the Helm chart start sidecars this way: ``specmeshctl`` imports what
only the CLI uses (httpx, rich, the spec diff...), ~7 MB of RSS per sidecar. It runs
:func:`sidecar.main.main`, the function ``specmesh sidecar`` runs, with the same arguments
and settings.
"""

from __future__ import annotations

import sys

from sidecar.main import main

if __name__ == "__main__":
    sys.exit(main())
