"""Generate the Python modules and mypy stubs of protos/qwenpd/v1/*.proto: `python -m qwenpd.protos.generate`.

The generated files are committed; tests/test_protos_fresh.py regenerates them into a temporary directory
and requires byte-identical output. protoc writes imports relative to the proto root (`from qwenpd.v1
import common_pb2`); we rewrite them to the package path (`from qwenpd.protos.qwenpd.v1 import common_pb2`) here,
never by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # the `protos` package; .proto paths are relative to it
PACKAGE_DIR = Path("qwenpd") / "v1"
PACKAGE_PREFIX = "qwenpd.protos."  # where the proto root lives in the Python import space

# `qwenpd.v1.<module>_pb2` / `qwenpd.v1 import` not already preceded by the package prefix
_IMPORT_RE = re.compile(r"(?<![\w.])qwenpd\.v1(?=\.\w+_pb2\b| import )")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugin, preferring the one installed beside this interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return found


def generate(out_root: Path) -> list[Path]:
    """Run protoc into out_root (a directory standing for the `protos` package); return the files written."""
    from grpc_tools import protoc  # a test/dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{_grpc_tools_include()}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            f"--mypy_out={raw}",
            f"--mypy_grpc_out={raw}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted((raw / PACKAGE_DIR).iterdir()):
            dst = out_root / PACKAGE_DIR / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_IMPORT_RE.sub(PACKAGE_PREFIX + "qwenpd.v1", src.read_text()))
            written.append(dst)
    return written


def _grpc_tools_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenpd.protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="directory standing for the `protos` package (default: the package itself)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
