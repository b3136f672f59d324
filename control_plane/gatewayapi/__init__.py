"""The Gateway API CRD schemas the control plane validates its routes against.

``crds.yaml`` is vendored package data: HTTPRoute and GRPCRoute (``gateway.networking.k8s.io/v1``)
of Gateway API v1.3.0, standard channel (see ``README.md`` beside it for what it holds, its
origin and how to replace it with the upstream files).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CRDS_PATH"]

CRDS_PATH = Path(__file__).resolve().parent / "crds.yaml"
"""The Gateway API CustomResourceDefinitions file (HTTPRoute, GRPCRoute)."""
