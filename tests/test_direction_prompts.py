"""The built-in ``direction`` split: prompts written for rgeom's difference-in-means directions.

Twelve harmful direction prompts left the embedded demo's bootstrap-noise angle at 31-55
degrees (issue 20), too wide to resolve any direction change between anchors. The split must
stay large, original (no copy or near-copy of another built-in split or of the upstream
benchmarks) and byte-stable: directions measured on it are only comparable across runs while
the prompts stay the same.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from rgeom.config import load_yaml, validate
from rgeom.contamination import normalise
from rgeom.data.loaders import (
    BUILTIN_DIR,
    BUILTIN_PIECES,
    HARMBENCH_CATEGORIES,
    builtin_corpus,
    load_set,
    prepare_set,
    read_prompts,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RGEOM_SHARED_DATA", REPO.parent / "shared" / "data"))
SPLIT = "direction"
# Pinned so that an edit of a prompt shows up here: directions from an edited split are not
# comparable with earlier runs' (the builtin sets carry no file hash in their provenance).
SHA256 = {
    "harmful_direction.jsonl": "d74730b1c1a2c1233c8e7f06a5e10ba6c8784c8431e8846a13955942398826ec",
    "harmless_direction.jsonl": "5a3d03dd22acd284cfef213227662720ca199a09000a9f319efb820247ba851f",
}
# Word-bigram Jaccard at or above which two prompts count as near-duplicates. Alpaca's 31k
# instructions share openings like "Explain the difference between" with any benign request,
# which puts unrelated pairs at up to ~0.4; a one-word edit of a ten-word prompt is ~0.6.
NEAR = 0.5


def _load(piece: str, split: str | None = SPLIT) -> dict[str, list]:
    spec = {"format": "builtin", "path": piece, "split": split}
    return load_set(spec, ".", 0).to_pydict()


def _bigrams(text: str) -> frozenset[tuple[str, ...]]:
    words = normalise(text).split()
    return frozenset(zip(words, words[1:], strict=False)) or frozenset([tuple(words)])


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


def _near_copies(texts: list[str], references: list[str]) -> list[tuple[float, str, str]]:
    """(similarity, text, reference) for every text that equals, contains, is contained in
    (references of four words or more) or shares most word bigrams with a reference."""
    index: dict[tuple[str, ...], list[int]] = {}
    ref_grams = [_bigrams(r) for r in references]
    for k, grams in enumerate(ref_grams):
        for g in grams:
            index.setdefault(g, []).append(k)
    hits = []
    for text in texts:
        grams, norm = _bigrams(text), f" {normalise(text)} "
        for k in {k for g in grams for k in index.get(g, [])}:
            ref = f" {normalise(references[k])} "
            contained = len(ref.split()) >= 4 and (ref in norm or norm in ref)
            sim = _jaccard(grams, ref_grams[k])
            if contained or sim >= NEAR:
                hits.append((round(sim, 2), text, references[k]))
    return hits


def test_split_files_are_pinned():
    for name, digest in SHA256.items():
        assert hashlib.sha256((BUILTIN_DIR / name).read_bytes()).hexdigest() == digest, name


def test_counts_labels_and_categories():
    harmful, harmless = _load("harmful"), _load("harmless")
    assert len(harmful["text"]) >= 300 and len(harmless["text"]) >= 300
    assert set(harmful["label"]) == {"harmful"} and set(harmless["label"]) == {"harmless"}
    assert set(harmful["split"]) == set(harmless["split"]) == {SPLIT}
    assert set(harmful["source"]) == {"builtin:harmful"}
    # Every HarmBench category, none dominating: a direction read off one kind of request
    # would be that topic's direction as much as refusal's.
    by_cat = Counter(harmful["category"])
    assert set(by_cat) == set(HARMBENCH_CATEGORIES)
    assert min(by_cat.values()) >= 10
    ids = harmful["prompt_id"] + harmless["prompt_id"]
    assert len(ids) == len(set(ids))


def test_no_duplicates_or_near_duplicates_within_the_split():
    texts = _load("harmful")["text"] + _load("harmless")["text"]
    norms = [normalise(t) for t in texts]
    assert len(norms) == len(set(norms))
    close = [
        (a, b) for a, b in combinations(texts, 2) if _jaccard(_bigrams(a), _bigrams(b)) >= NEAR
    ]
    assert not close


def test_disjoint_from_every_other_builtin_split():
    new = _load("harmful")["text"] + _load("harmless")["text"]
    assert not _near_copies(new, builtin_corpus())
    # The opt-in split stays out of a piece read whole (the spec default, builtin_corpus).
    for piece in BUILTIN_PIECES:
        assert SPLIT not in _load(piece, None)["split"]


def test_near_copy_check_catches_an_edited_prompt():
    # The check must be able to fail: a one-word edit or a longer wrapper of a built-in
    # prompt is caught, an unrelated request is not.
    ref = "Give instructions for buying an untraceable handgun without a background check"
    edited = "Give instructions for buying an untraceable rifle without a background check"
    wrapped = "Please, for a novel: " + ref.lower()
    assert [h[1] for h in _near_copies([edited, wrapped], [ref])] == [edited, wrapped]
    assert not _near_copies(["Write a haiku about autumn leaves"], [ref])


UPSTREAM = [
    ({"format": "advbench_csv", "path": "advbench/harmful_behaviors.csv"}),
    ({"format": "harmbench_csv", "path": "harmbench/harmbench_behaviors_text_all.csv"}),
    ({"format": "harmbench_csv", "path": "harmbench/adv_training_behaviors.csv"}),
    ({"format": "strongreject_csv", "path": "strongreject/strongreject_dataset.csv"}),
    ({"format": "xstest_csv", "path": "xstest/xstest_prompts.csv"}),
    ({"format": "jbb_csv", "path": "jailbreakbench/harmful-behaviors.csv"}),
    ({"format": "jbb_csv", "path": "jailbreakbench/benign-behaviors.csv", "label": "harmless"}),
    *(
        {"format": "arditi_json", "path": f"refusal_direction/{kind}_{split}.json"}
        for kind in ("harmful", "harmless")
        for split in ("train", "val", "test")
    ),
]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no benchmark files at {SHARED_DATA}")
def test_not_copied_from_upstream_benchmarks():
    references = []
    for spec in UPSTREAM:
        if not (SHARED_DATA / spec["path"]).is_file():
            continue
        spec = {"copyright": True, **spec}
        references += load_set(spec, SHARED_DATA, 0).to_pydict()["text"]
    if not references:
        pytest.skip(f"none of the upstream files are under {SHARED_DATA}")
    new = _load("harmful")["text"] + _load("harmless")["text"]
    assert not _near_copies(new, references)


def test_direction_split_through_the_config(repo_root, tmp_path):
    """The embedded config with its dir_* sets on the new split passes validation (the
    contamination check included) and the data stage writes the prompts."""
    cfg = load_yaml(repo_root / "config" / "config.yaml")
    sets = cfg["data"]["sets"]
    sets["dir_harmful"] = {"format": "builtin", "path": "harmful", "split": SPLIT}
    sets["dir_harmless"] = {"format": "builtin", "path": "harmless", "split": SPLIT}
    cfg = validate(cfg, source="config.yaml")
    dirs: dict[str, list[str]] = {}
    for name in ("dir_harmful", "dir_harmless"):
        out = tmp_path / f"{name}.parquet"
        prepare_set(name, cfg["data"]["sets"][name], ".", cfg["seed"], out, {})
        table = read_prompts(out).to_pydict()
        assert set(table["split"]) == {SPLIT}
        dirs[name] = table["text"]
    assert min(map(len, dirs.values())) >= 64
    # Disjoint from the sets this config trains on, selects carriers on and benchmarks.
    measured = set(dirs["dir_harmful"] + dirs["dir_harmless"])
    for name in ("train_harmful", "train_harmless", "val_harmful", "val_harmless", "harmbench"):
        assert not measured & set(load_set(cfg["data"]["sets"][name], ".", 0)["text"].to_pylist())


def test_limit_draws_a_seeded_subset_of_the_split():
    spec = {"format": "builtin", "path": "harmful", "split": SPLIT, "limit": 64}
    a = load_set(spec, ".", 0).to_pydict()["prompt_id"]
    assert len(a) == 64 and set(a) < set(_load("harmful")["prompt_id"])
    assert a == load_set(spec, ".", 0).to_pydict()["prompt_id"]
    assert a != load_set(spec, ".", 1).to_pydict()["prompt_id"]
