"""``rgeom check-config`` and ``rgeom provenance``: tool commands that run no stage.

They import what they need inside: ``rgeom.stages`` re-exports :func:`check_config`, and
``import rgeom.cli`` (which every job under ``rgeom warm`` pays before it is forwarded) must
stay free of pyarrow and jsonschema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rgeom.errors import RgeomError


def check_config(config: str, print_config: bool = False) -> None:
    """Validate; end with one "OK: ..." line. ``--print`` puts the resolved config on stdout
    (so ``$(rgeom check-config --print F)`` is JSON) and the OK line on stderr."""
    from rgeom.config import describe, load

    cfg = load(config)
    model = cfg.get("model", {})
    if model.get("dtype") == "bfloat16" and model.get("device") == "cpu":
        from rgeom.models import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            print(
                f"note: {config}: model.dtype is bfloat16 on a CPU without native bfloat16 "
                "(no avx512_bf16 or amx_bf16 flag): its matmuls are emulated, several times "
                "slower than float32; model.dtype: float32 runs faster here (other numbers)",
                file=sys.stderr,
            )
    ok = f"OK: {config}: {describe(cfg)}"
    if print_config:
        print(json.dumps(cfg, indent=2, sort_keys=True))
        print(ok, file=sys.stderr)
    else:
        print(ok)


def provenance_cmd(file: str) -> None:
    """Print the provenance record stored in an rgeom Parquet file."""
    from rgeom.io import read_meta

    path = Path(file)
    if not path.exists():
        raise RgeomError(f"no such file: {path}")
    print(json.dumps(read_meta(path), indent=2, sort_keys=True))
