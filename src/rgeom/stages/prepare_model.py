"""``rgeom prepare-model``: the source model as a plain Hugging Face directory."""

from __future__ import annotations

import logging
from typing import Any

from rgeom.config import setting
from rgeom.stages import StageCommand, arg
from rgeom.stages._common import seed_stage

log = logging.getLogger(__name__)

COMMAND = StageCommand(
    help="Materialise the source model as a plain Hugging Face directory.",
    example='rgeom prepare-model --out results/model --params \'{"source": "smollm2_gguf"}\'',
    args=(arg("--out", required=True, help="output model directory"),),
)


def run(out: str, params: dict[str, Any]) -> None:
    from rgeom.models import prepare_model

    seed = seed_stage(params)
    prepare_model(
        source=setting(params, "model.source"),
        out_dir=out,
        path=setting(params, "model.path"),
        gguf_file=setting(params, "model.gguf_file"),
        dtype=setting(params, "model.dtype"),
        trust_remote_code=setting(params, "model.trust_remote_code"),
        seed=seed,
        chat_template=setting(params, "model.chat_template"),
    )
    log.info("model ready at %s", out)
