"""Refresh the vendored Istio CRD schemas (``control_plane/istio/``).

Takes the file ``kubernetes/customresourcedefinitions.gen.yaml`` of the istio/api repository
at tag ``VERSION`` -- downloaded from GitHub, or an offline copy given with ``--from`` --
checks that it is a CRD file holding the resources the control plane renders, writes it as
``crd-all.gen.yaml`` and rewrites the version, tag and sha256 in the ``README.md`` beside it.
``--dest`` names another folder holding both files (the tests refresh a temporary copy).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

__all__ = ["DEST", "REQUIRED_KINDS", "SOURCE_PATH", "main", "refresh", "source_url"]

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "control_plane" / "istio"
"""The folder holding the vendored file and its README."""
SOURCE_PATH = "kubernetes/customresourcedefinitions.gen.yaml"
"""The file's path in the istio/api repository."""
REQUIRED_KINDS = frozenset(
    {
        ("networking.istio.io", "VirtualService"),
        ("networking.istio.io", "DestinationRule"),
        ("security.istio.io", "AuthorizationPolicy"),
        ("security.istio.io", "PeerAuthentication"),
        ("telemetry.istio.io", "Telemetry"),
    }
)
"""(group, kind) pairs the control plane renders: a file without one of them is refused."""

_VERSION = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?")
_README_ROWS = (
    (re.compile(r"^\| Istio version \| [^|]+ \|$", re.M), "| Istio version | {version} |"),
    (re.compile(r"^(\| source \| .*?tag )`[^`]+`", re.M), r"\g<1>`{version}`"),
    (re.compile(r"^\| sha256 \| `[0-9a-f]{64}` \|$", re.M), "| sha256 | `{sha256}` |"),
)


def source_url(version: str) -> str:
    """The raw GitHub address of the file at tag ``version`` of istio/api."""
    return f"https://raw.githubusercontent.com/istio/api/{version}/{SOURCE_PATH}"


def _download(version: str) -> bytes:
    url = source_url(version)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data: bytes = response.read()
    except OSError as e:
        raise OSError(f"download {url}: {e}") from e
    return data


def _check(data: bytes) -> None:
    """Refuse a file that is not Istio's CRD file (a wrong path, an HTML error page...)."""
    kinds = set()
    for doc in yaml.safe_load_all(data):
        if not doc:
            continue
        if doc.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"not a CustomResourceDefinition: kind {doc.get('kind')!r}")
        kinds.add((doc["spec"]["group"], doc["spec"]["names"]["kind"]))
    missing = sorted(REQUIRED_KINDS - kinds)
    if missing:
        raise ValueError(f"CRD file lacks {', '.join(f'{g}/{k}' for g, k in missing)}")


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (a temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refresh(version: str, *, data: bytes, dest: Path = DEST) -> str:
    """Write ``data`` (the CRD file of Istio ``version``) into ``dest`` and update its
    README; returns the file's sha256."""
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version: must look like 1.30.3 (got {version!r})")
    _check(data)
    sha256 = hashlib.sha256(data).hexdigest()
    readme_path = dest / "README.md"
    readme = readme_path.read_text()
    for pattern, template in _README_ROWS:
        readme, count = pattern.subn(template.format(version=version, sha256=sha256), readme)
        if count != 1:
            raise ValueError(f"{readme_path}: expected one line matching {pattern.pattern!r}")
    _write(dest / "crd-all.gen.yaml", data)
    _write(readme_path, readme.encode())
    return sha256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refresh-istio-crds", description=__doc__)
    parser.add_argument("version", help="Istio release, the istio/api tag (e.g. 1.30.3)")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help=f"an offline copy of {SOURCE_PATH} at that tag (instead of downloading it)",
    )
    parser.add_argument(
        "--dest", type=Path, default=DEST, help="folder of crd-all.gen.yaml and README.md"
    )
    args = parser.parse_args(argv)
    try:
        data = args.source.read_bytes() if args.source else _download(args.version)
        sha256 = refresh(args.version, data=data, dest=args.dest)
    except (OSError, ValueError, yaml.YAMLError) as e:
        sys.stderr.write(f"refresh-istio-crds: {e}\n")
        return 1
    sys.stdout.write(f"Istio {args.version} CRDs -> {args.dest} (sha256 {sha256})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
