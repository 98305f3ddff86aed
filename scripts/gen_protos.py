"""Regenerate engine_api/ from protos/ (the only way generated code is made).

The generator versions are pinned in pyproject.toml's `gen` extra. Files are compiled with `-I protos`,
so protoc writes `from engine.v1 import ...`; those imports are rewritten to the `engine_api.engine.v1`
package they are installed under.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "engine_api"
IMPORT_FROM_PROTO_PACKAGE = re.compile(r"^from engine\.v1 import", re.MULTILINE)
PACKAGE_DOC = '"""Generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def main() -> int:
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    grpc_tools_protos = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{grpc_tools_protos}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            f"--mypy_out={OUT}",
            f"--mypy_grpc_out={OUT}",
            *protos,
        ]
    )
    if status != 0:
        return status
    for generated in OUT.rglob("*.py*"):
        text = generated.read_text()
        generated.write_text(IMPORT_FROM_PROTO_PACKAGE.sub("from engine_api.engine.v1 import", text))
    for package in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (package / "__init__.py").write_text(PACKAGE_DOC)
    (OUT / "py.typed").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
