"""Hostile or broken manifest files are refused quickly, through the real CLI entry point.

Every case runs ``specmesh validate -f FILE`` in-process in a worker thread and asserts
that it finished within two seconds (a hang guard, not a timing goal: those live in
``bench/``), exited non-zero, and named the file on stderr.
"""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from specmesh.spec.manifest import MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH, MAX_NODES
from specmeshctl.main import main

_HANG_GUARD_SECONDS = 2.0


def _billion_laughs() -> str:
    """The classic: nine levels of nine aliases each, 10**9 strings once expanded."""
    lines = ['lol1: &lol1 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(2, 10):
        aliases = ",".join([f"*lol{level - 1}"] * 9)
        lines.append(f"lol{level}: &lol{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def _billion_laughs_manifest() -> str:
    """The same inside an Agent manifest, where validation walks the expansion."""
    laughs = "".join(f"  {line}\n" for line in _billion_laughs().splitlines())
    return (
        "apiVersion: specmesh.io/v1\nkind: Agent\nmetadata: {name: lol}\n"
        f"x-laughs:\n{laughs}spec: *lol9\n"
    )


_DEEP = 100_000
_TOO_DEEP = f"nested more than {MAX_NESTING_DEPTH} deep"
_TOO_MANY = f"more than {MAX_NODES} values once aliases are expanded"
_EMPTY = "no manifest in it"


@dataclass(frozen=True)
class Bad:
    name: str
    """File name (its suffix picks the parser)."""
    content: bytes
    reason: str
    """A fragment the error message must hold."""


BAD_FILES = [
    pytest.param(Bad("laughs.yaml", _billion_laughs().encode(), _TOO_MANY), id="billion-laughs"),
    pytest.param(
        Bad("agent.yaml", _billion_laughs_manifest().encode(), _TOO_MANY),
        id="billion-laughs-in-an-agent-manifest",
    ),
    pytest.param(Bad("deep.json", b"[" * _DEEP + b"]" * _DEEP, _TOO_DEEP), id="deep-json-100k"),
    pytest.param(
        Bad("deep-bare.yaml", b"[" * _DEEP + b"]" * _DEEP, _TOO_DEEP),
        id="deep-bare-brackets-in-a-yaml-file",
    ),
    pytest.param(
        Bad("deep-flow.yaml", b"spec: " + b"[" * _DEEP + b"]" * _DEEP + b"\n", _TOO_DEEP),
        id="deep-yaml-flow-100k",
    ),
    pytest.param(
        Bad("deep-block-seq.yaml", b"spec:\n" + b"- " * _DEEP + b"x\n", _TOO_DEEP),
        id="deep-yaml-block-sequence-100k",
    ),
    pytest.param(
        Bad(
            "deep-block-map.yaml",
            b"".join(b" " * i + b"k:\n" for i in range(1000)) + b" " * 1000 + b"k: v\n",
            _TOO_DEEP,
        ),
        id="deep-yaml-block-mapping",
    ),
    pytest.param(
        Bad(
            "dup.yaml",
            b"apiVersion: specmesh.io/v1\nkind: Agent\nkind: Prompt\n",
            "3:1: duplicate key 'kind' (first at line 2, column 1)",
        ),
        id="duplicate-key-yaml",
    ),
    pytest.param(
        Bad(
            "dup.json",
            b'{"apiVersion": "specmesh.io/v1",\n "kind": "Agent",\n "kind": "Prompt"}',
            "3:2: duplicate key 'kind' (first at line 2, column 2)",
        ),
        id="duplicate-key-json",
    ),
    pytest.param(
        Bad("dup-escaped.json", b'{"kind": 1, "\\u006bind": 2}', "duplicate key 'kind'"),
        id="duplicate-key-json-spelled-with-an-escape",
    ),
    pytest.param(
        Bad("loop.yaml", b"spec: &a [*a]\n", "alias *a refers to a node that contains it"),
        id="recursive-alias",
    ),
    pytest.param(Bad("empty.yaml", b"", _EMPTY), id="empty-file"),
    pytest.param(Bad("blank.yaml", b"\n  \n", _EMPTY), id="whitespace-only"),
    pytest.param(Bad("empty.json", b"", _EMPTY), id="empty-json-file"),
    pytest.param(Bad("comments.yaml", b"# nothing\n# here\n", _EMPTY), id="comments-only"),
    pytest.param(Bad("markers.yaml", b"---\n# x\n---\n", _EMPTY), id="document-markers-only"),
    pytest.param(Bad("latin1.yaml", b"\xff\xfe kind: Agent", "not UTF-8 text"), id="not-utf-8"),
    pytest.param(
        Bad("big.yaml", b"# " + b"x" * MAX_DOCUMENT_BYTES + b"\n", "the limit"),
        id="over-the-size-limit",
    ),
]


def _run_cli(argv: list[str]) -> int:
    """``main(argv)`` in a worker thread; fail if it has not returned within the guard."""
    outcome: list[int | BaseException] = []

    def run() -> None:
        try:
            outcome.append(main(argv))
        except BaseException as e:  # handed to the test thread below
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=_HANG_GUARD_SECONDS)
    assert not worker.is_alive(), f"specmesh {' '.join(argv)} still running after 2 s"
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def _valid_lines(out: str) -> list[str]:
    """The ``valid: ...`` lines of validate's output (it may add warnings below each)."""
    return [line for line in out.splitlines() if line.startswith("valid: ")]


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize("bad", BAD_FILES)
def test_bad_file_is_refused_quickly_naming_the_file(
    bad: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / bad.name
    path.write_bytes(bad.content)

    code = _run_cli(["validate", "-f", str(path)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"{path}" in err
    assert bad.reason in err


@pytest.mark.parametrize("bad", BAD_FILES)
def test_bad_input_on_stdin_is_refused_quickly_naming_stdin(
    bad: Bad, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stdin(monkeypatch, bad.content)

    code = _run_cli(["validate", "-f", "-"])

    err = capsys.readouterr().err
    assert code == 1
    assert "<stdin>" in err
    assert bad.reason in err


def test_failure_names_the_line_and_column_of_the_alias_that_overflows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(_billion_laughs())

    _run_cli(["validate", "-f", str(path)])

    # lol5 is 9**5 = 59049 strings (over MAX_NODES): its first alias crosses the limit
    assert MAX_NODES < 9**5
    assert f"{path}:5:" in capsys.readouterr().err


_FLEET = """\
# two manifests; the agent reuses one header block through an anchor
apiVersion: specmesh.io/v1
kind: Agent
metadata: {name: scheduleX-assistant}
spec:
  base: {description: Schedules jobs., promptKey: mse-nacos-helper}
  model: {model: qwen-plus-latest}
  mcpServers:
  - mcpServerName: gaode
    headers: &team {x-team: search}
  - mcpServerName: nacos-mcp-tools
    headers: *team
---
apiVersion: specmesh.io/v1
kind: McpServer
metadata: {name: gaode}
spec:
  url: http://localhost:8000/mcp
"""


def test_multi_document_yaml_with_an_alias_still_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(_FLEET)

    code = _run_cli(["validate", "-f", str(path)])

    assert code == 0
    assert _valid_lines(capsys.readouterr().out) == [
        f"valid: Agent/scheduleX-assistant ({path}#1)",
        f"valid: McpServer/gaode ({path}#2)",
    ]


def test_manifest_on_stdin_loads_as_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stdin(monkeypatch, _FLEET.encode())

    code = _run_cli(["validate", "-f", "-"])

    assert code == 0
    assert _valid_lines(capsys.readouterr().out) == [
        "valid: Agent/scheduleX-assistant (<stdin>#1)",
        "valid: McpServer/gaode (<stdin>#2)",
    ]


def test_a_key_that_overrides_a_merged_key_is_not_a_duplicate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(
        "apiVersion: specmesh.io/v1\nkind: McpServer\nmetadata: {name: gaode}\n"
        "spec:\n  <<: {url: http://localhost:1/mcp}\n  url: http://localhost:8000/mcp\n"
    )

    code = _run_cli(["validate", "-f", str(path)])

    assert code == 0, capsys.readouterr().err


def test_empty_part_file_in_an_agent_folder_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "helper"
    folder.mkdir()
    (folder / "agent-base.json").write_text('{"description": "Helps.", "promptKey": "p"}')
    (folder / "model.json").write_text("")

    code = _run_cli(["validate", "-f", str(folder)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"{folder / 'model.json'}: {_EMPTY}" in err
