"""``rgeom record-config``: the validated config, defaults filled in, as JSON."""

from __future__ import annotations

from typing import Any

from rgeom.config import validate
from rgeom.io import write_json
from rgeom.stages import StageCommand, arg

COMMAND = StageCommand(
    help="Write the validated config, defaults filled in, as JSON (for `rgeom compare`).",
    example="rgeom record-config --out results/config.json \\\n"
    '    --params "$(rgeom check-config --print config/config.yaml)"',
    args=(arg("--out", required=True, help="output JSON file"),),
)


def run(out: str, params: dict[str, Any]) -> None:
    # Validated again so the record always has every default filled in: two runs whose
    # configs differ only in spelling out a default then compare as equal.
    write_json(out, validate(params, source="record-config --params", check_files=False))
