"""`make breaking-go-live`: our proto/ against the live Go repository's protos.

    python python/scripts/breaking_live.py --upstream INPUT --pinned DIR --proto-root DIR
                                           --config JSON

INPUT is any buf input: the Go repository's proto folder as a git URL (hosted CI), or a
local folder (the gate's tests). The files the pin holds (go-compat-tests/go-contract/) are
taken from it by name, so unrelated protos upstream never fail the gate, and `buf breaking`
runs with the Go gate's PACKAGE rules. When that fails, or a pinned file is gone upstream,
the message ends with a unified diff of the upstream files against the pin: what changed
upstream since go-contract/ was last refreshed.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_BUF_TIMEOUT_SECONDS = 300


def _buf() -> str:
    found = shutil.which("buf")
    if found is None:
        sys.exit("breaking-go-live: buf is not on PATH (run through `make breaking-go-live`)")
    return found


def upstream_diff(pinned: Path, upstream: Path) -> str:
    """A unified diff of every pinned file against its upstream namesake (empty when equal)."""
    parts: list[str] = []
    for pin in sorted(pinned.glob("*.proto")):
        theirs = upstream / pin.name
        new = theirs.read_text().splitlines(keepends=True) if theirs.exists() else []
        parts.extend(
            difflib.unified_diff(
                pin.read_text().splitlines(keepends=True),
                new,
                fromfile=f"go-contract/{pin.name} (pinned)",
                tofile=f"upstream/{pin.name}" if theirs.exists() else "upstream: (file gone)",
            )
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the gate; 0 when our proto/ is compatible with the upstream contract."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="a buf input holding the Go protos")
    parser.add_argument("--pinned", required=True, type=Path, help="go-compat-tests/go-contract")
    parser.add_argument("--proto-root", required=True, type=Path, help="holds buf.yaml, proto/")
    parser.add_argument("--config", required=True, help="the buf breaking config (JSON)")
    args = parser.parse_args(argv)
    buf = _buf()
    with tempfile.TemporaryDirectory(prefix="breaking-live-") as scratch:
        exported = Path(scratch) / "exported"
        export = subprocess.run(
            [buf, "export", args.upstream, "-o", str(exported)],
            capture_output=True,
            text=True,
            timeout=_BUF_TIMEOUT_SECONDS,
            check=False,
        )
        if export.returncode != 0:
            print(
                f"breaking-go-live: could not read the upstream protos from {args.upstream}:\n"
                f"{export.stderr}",
                file=sys.stderr,
            )
            return 1
        contract = Path(scratch) / "upstream"
        contract.mkdir()
        missing = []
        for pin in sorted(args.pinned.glob("*.proto")):
            theirs = exported / pin.name
            if theirs.exists():
                shutil.copy(theirs, contract / pin.name)
            else:
                missing.append(pin.name)
        diff = upstream_diff(args.pinned, contract)
        if missing:
            print(
                f"breaking-go-live: {', '.join(missing)} no longer upstream ({args.upstream}).\n"
                f"What changed upstream since go-compat-tests/go-contract/ was pinned:\n{diff}",
                file=sys.stderr,
            )
            return 1
        check = subprocess.run(
            [buf, "breaking", "--against", str(contract), "--config", args.config],
            cwd=args.proto_root,
            capture_output=True,
            text=True,
            timeout=_BUF_TIMEOUT_SECONDS,
            check=False,
        )
        if check.returncode != 0:
            print(
                f"breaking-go-live: proto/ is not compatible with the live Go contract "
                f"({args.upstream}):\n{check.stdout}{check.stderr}\n"
                f"What changed upstream since go-compat-tests/go-contract/ was pinned:\n{diff}",
                file=sys.stderr,
            )
            return 1
    if diff:
        print(
            "breaking-go-live: compatible, but upstream changed since go-contract/ was pinned "
            f"(refresh the pin):\n{diff}"
        )
    else:
        print("breaking-go-live: compatible with the live Go contract, which matches the pin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
