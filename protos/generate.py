"""Regenerate the Python stubs from ``protos/*.proto``: ``python -m protos.generate [--check]``.

``--check`` generates into a temporary directory and exits 1 if any committed stub differs.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "protos"
# The generated _pb2_grpc.py requires grpcio >= this at import; keep it at the GPU image's grpcio.
GENERATOR_VERSION = "1.84.0"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{REPO}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(REPO)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    have = version("grpcio-tools")
    if have != GENERATOR_VERSION:
        print(f"grpcio-tools {have} installed; stubs are generated with {GENERATOR_VERSION}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [
            g.name
            for g in generated
            if not (PROTO_DIR / g.name).is_file() or not filecmp.cmp(g, PROTO_DIR / g.name, shallow=False)
        ]
        committed = {p.name for p in PROTO_DIR.glob("*_pb2*.py*")}
        extra = sorted(committed - {g.name for g in generated})
        if args.check:
            if stale or extra:
                print(f"stale stubs: {stale + extra}; run `python -m protos.generate`", file=sys.stderr)
                return 1
            print(f"{len(generated)} stubs up to date")
            return 0
        for g in generated:
            (PROTO_DIR / g.name).write_bytes(g.read_bytes())
        for name in extra:
            (PROTO_DIR / name).unlink()
        print(f"wrote {len(generated)} stubs to {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
