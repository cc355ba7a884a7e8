"""Prompt sets: upstream benchmark loaders, the built-in suite, and the prompt table format."""

from rgeom.data.loaders import (
    BUILTIN_PIECES,
    HARMBENCH_CATEGORIES,
    LABELS,
    PROMPT_SCHEMA,
    builtin_corpus,
    load_set,
    prepare_set,
    prompt_text,
    read_prompts,
)

__all__ = [
    "BUILTIN_PIECES",
    "HARMBENCH_CATEGORIES",
    "LABELS",
    "PROMPT_SCHEMA",
    "builtin_corpus",
    "load_set",
    "prepare_set",
    "prompt_text",
    "read_prompts",
]
