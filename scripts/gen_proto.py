"""Generate the Python code of the gRPC contracts in ``proto/specmesh/v1``.

One command for both ``scripts/gen-proto`` (which writes ``specmesh/v1/``) and the test
that checks the committed code is current (which writes into a temporary folder and
compares). Messages come from protoc's Python generator, services from grpcio-tools, the
descriptor set with comments (``descriptors.binpb``, for the OpenAPI document) from protoc,
and type stubs (``.pyi``) from mypy-protobuf's ``protoc-gen-mypy`` and
``protoc-gen-mypy_grpc``.

With ``-I proto``, ``proto/specmesh/v1/x.proto`` becomes ``<out>/specmesh/v1/x_pb2.py``, so
generated imports (``from specmesh.v1 import common_pb2``) resolve to our own package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

__all__ = ["GENERATED_SUFFIXES", "PACKAGE", "PROTO_ROOT", "REPO", "generate", "generated_files"]

REPO = Path(__file__).resolve().parent.parent
"""The repository root."""
PROTO_ROOT = REPO / "proto"
"""The protoc include root of our own protos."""
PACKAGE = Path("specmesh") / "v1"
"""Where generated modules land, relative to the output root (and to the repository)."""
DESCRIPTOR_SET = "descriptors.binpb"
"""The descriptor set of our protos with source info (their comments), for the OpenAPI
document (control_plane/openapi.py)."""
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", DESCRIPTOR_SET)
"""Name endings of generated files; anything else in ``specmesh/v1`` is hand-written."""

_PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed beside this interpreter (the venv's bin)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the dev dependencies (uv sync)")
    return found


def _command(out_dir: Path) -> list[str]:
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    protos = sorted(
        p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / PACKAGE).glob("*.proto")
    )
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        *(f"--plugin={name}={_plugin(name)}" for name in _PLUGINS),
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--descriptor_set_out={out_dir / PACKAGE / DESCRIPTOR_SET}",
        "--include_source_info",
        *protos,
    ]


def generate(out_dir: Path) -> None:
    """Generate the code of every ``proto/specmesh/v1/*.proto`` under ``out_dir/specmesh/v1``."""
    (out_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(_command(out_dir), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")


def generated_files(package_dir: Path) -> dict[str, bytes]:
    """The generated files in ``package_dir``, by name, with their bytes."""
    return {
        p.name: p.read_bytes()
        for p in sorted(package_dir.iterdir())
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    """Regenerate ``specmesh/v1`` in place, removing modules of protos that are gone."""
    for name in generated_files(REPO / PACKAGE):
        (REPO / PACKAGE / name).unlink()
    generate(REPO)
    for name in generated_files(REPO / PACKAGE):
        print(f"gen-proto: {PACKAGE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
