"""The Istio CRD schemas the control plane validates its Istio objects against.

``crd-all.gen.yaml`` is vendored package data (see ``README.md`` beside it for its version,
origin, licence and checksum, and ``scripts/refresh-istio-crds`` to move to another Istio
release): the control plane, the wheel and the image carry it, so validation needs nothing
outside the repository.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CRDS_PATH"]

CRDS_PATH = Path(__file__).resolve().parent / "crd-all.gen.yaml"
"""The Istio CustomResourceDefinitions file (every resource's ``openAPIV3Schema``)."""
