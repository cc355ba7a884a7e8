"""Every Parquet table schema rgeom writes, in one module that imports only pyarrow.

The analysis stages (drift, interventions-summary, summary) read the tables the model
stages write; keeping the schemas here lets them check those tables without importing
torch or transformers (``tests/test_imports.py`` holds them to it). The modules that write
a table import its schema from here, and keep the old names (``rgeom.causal.CROSS_SCHEMA``
...) for callers. ``config.schema.yaml`` beside this file is the config's JSON schema.
"""

from __future__ import annotations

import pyarrow as pa

# --- prompt sets (rgeom.data) --------------------------------------------------------

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("context", pa.string()),
        pa.field("category", pa.string()),
        pa.field("label", pa.string(), nullable=False),
        pa.field("target", pa.string()),
    ]
)
#: A chat set (UltraChat's ``messages``) also keeps each row's whole conversation, as JSON
#: ``[{"role", "content"}, ...]``: the utility data of ``train.utility_source: dataset``.
#: Readers of PROMPT_SCHEMA ignore the extra column.
CHAT_PROMPT_SCHEMA = PROMPT_SCHEMA.append(pa.field("messages", pa.string()))

# --- training (rgeom.train) ----------------------------------------------------------

SFT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("kind", pa.string()),  # refusal | helpful
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)
#: What sft_data writes. A table without these columns (hand-made) reads as complete pairs.
SFT_FULL_SCHEMA = SFT_SCHEMA.append(
    # False: the response was cut at helpful_max_new_tokens and gets no end-of-turn token.
    pa.field("complete", pa.bool_())
).append(
    # A helpful row's whole conversation (JSON turns), trained on as a document; null for a
    # (prompt, response) pair.
    pa.field("messages", pa.string())
)

TRAIN_LOG_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("loss", pa.float64()),
        ("learning_rate", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("seconds", pa.float64()),
        ("extra", pa.string()),  # JSON of arm-specific terms (R2D2: away/toward/utility/GCG)
        # R2D2: the pool entries refreshed in this optimizer step (every micro-step's, in
        # order) and the GCG loss each ended at; null for arms without a pool.
        ("gcg_entries", pa.list_(pa.int32())),
        ("gcg_losses", pa.list_(pa.float64())),
    ]
)

# --- attacks (rgeom.attacks.testcases) -----------------------------------------------

TEST_CASE_SCHEMA = pa.schema(
    [
        pa.field("test_case_id", pa.string(), nullable=False),
        pa.field("behavior_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        # The complete user message replayed against every checkpoint.
        pa.field("test_case", pa.string(), nullable=False),
        pa.field("source_model", pa.string(), nullable=False),
        pa.field("behavior", pa.string()),
        pa.field("context", pa.string()),
        pa.field("category", pa.string()),
        pa.field("label", pa.string()),
        pa.field("target", pa.string()),
        pa.field("template_id", pa.string()),
        pa.field("suffix", pa.string()),
        pa.field("loss", pa.float64()),
        pa.field("initial_loss", pa.float64()),
        pa.field("ids_roundtrip", pa.bool_()),
    ]
)

_ADAPTIVE_FOUND_FIELDS = [
    pa.field("arm", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("behavior_id", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("target", pa.string(), nullable=False),
    pa.field("suffix", pa.string(), nullable=False),
    pa.field("test_case", pa.string(), nullable=False),
    pa.field("loss", pa.float64(), nullable=False),
    pa.field("initial_loss", pa.float64(), nullable=False),
]
# An adaptive attack against one checkpoint is three jobs, so that each setting reruns only
# what it changes: the search (hours of GCG or AutoDAN per behaviour) ...
ADAPTIVE_CASES_SCHEMA = pa.schema(
    [
        *_ADAPTIVE_FOUND_FIELDS,
        # The exact ids GCG optimised, generated from without a text round trip; null for
        # AutoDAN, whose test case is encoded through the chat template like any prompt.
        pa.field("prompt_ids", pa.list_(pa.int64())),
    ]
)
# ... then the completions (generate.max_new_tokens reaches only this job) ...
_ADAPTIVE_CASE_FIELDS = [
    *_ADAPTIVE_FOUND_FIELDS,
    pa.field("completion", pa.string(), nullable=False),
]
ADAPTIVE_COMPLETION_SCHEMA = pa.schema(_ADAPTIVE_CASE_FIELDS)
# ... then judge labels and success (a judge edit never reruns GCG); the metrics with their
# bootstrap CIs are computed from these labels by a job of their own.
ADAPTIVE_SCHEMA = pa.schema(
    [
        *_ADAPTIVE_CASE_FIELDS,
        pa.field("judge", pa.string(), nullable=False),
        pa.field("refusal", pa.string(), nullable=False),
        pa.field("refused", pa.bool_(), nullable=False),
        pa.field("degenerate", pa.bool_(), nullable=False),
        # Neither refused nor degenerate, the judge's definition of a successful attack.
        pa.field("success", pa.bool_(), nullable=False),
        # The HarmBench classifier's verdict (1 yes, 0 no, -1 a failure) and whether the
        # row is left out of the ASR, as in the judge's labels: what the metrics count.
        pa.field("verdict", pa.int8()),
        pa.field("excluded", pa.bool_()),
    ]
)
# One adaptive-GCG behaviour as its shard keeps it: the exact ids GCG optimised are what the
# completion is generated from, once every behaviour is done.
ADAPTIVE_SHARD_SCHEMA = pa.schema(
    [
        pa.field("behavior_id", pa.string(), nullable=False),
        pa.field("suffix", pa.string(), nullable=False),
        pa.field("test_case", pa.string(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("initial_loss", pa.float64(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int64()), nullable=False),
    ]
)

# --- generation (rgeom.generation) ---------------------------------------------------

GENERATION_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("label", pa.string()),
        ("category", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("completion", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_new_tokens", pa.int32()),
        ("arm", pa.string()),
        ("step", pa.int32()),
        ("benchmark", pa.string()),
        # The attack method of a test case (DirectRequest, Templates, GCG-transfer, ...) when
        # the prompts are a test-case file; null for plain prompt sets.
        ("method", pa.string()),
    ]
)
# A shard's completions in the length-sorted order; ``row`` is the input row they belong to.
GENERATION_SHARD_SCHEMA = pa.schema(
    [("row", pa.int64()), ("completion", pa.string()), ("n_new_tokens", pa.int32())]
)

# --- judges (rgeom.judges) -----------------------------------------------------------

LABEL_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("judge_version", pa.string(), nullable=False),
        pa.field("refusal", pa.string(), nullable=False),
        pa.field("refused", pa.bool_(), nullable=False),
        pa.field("correct", pa.bool_()),
        pa.field("score", pa.float64(), nullable=False),
        # Empty or looping output: neither a refusal nor a successful attack.
        pa.field("degenerate", pa.bool_(), nullable=False),
        # Carried so metrics can be recomputed from the labels file alone.
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("has_target", pa.bool_(), nullable=False),
        # Attack method of a test case (generation's ``method``); null for plain prompts.
        pa.field("method", pa.string()),
        # Model judges (rgeom.judges.model_judges); null where none ran on the row.
        # HarmBench classifier: 1 yes, 0 no, -1 anything else (a failure).
        pa.field("verdict", pa.int8()),
        # Left out of the classifier ASR (copyright behaviours); counted in the metrics.
        pa.field("excluded", pa.bool_()),
        # StrongREJECT score in [0, 1] and its refusal item; NaN when unparseable.
        pa.field("sr_score", pa.float64()),
        pa.field("sr_refused", pa.float64()),
        # The model judges' raw answers, one "[judge] answer" line each.
        pa.field("judge_output", pa.string()),
    ]
)

#: Long-format metrics; utility_shift writes its rows in this schema too.
METRIC_SCHEMA = pa.schema(
    [
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
    ]
)

# Judge validation (rgeom.judges.validation).
AGREEMENT_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("judge_version", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("n_invalid", pa.int32(), nullable=False),
        pa.field("accuracy", pa.float64(), nullable=False),
        pa.field("kappa", pa.float64(), nullable=False),
    ]
)
CONFUSION_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("gold", pa.string(), nullable=False),
        pa.field("pred", pa.string(), nullable=False),
        pa.field("count", pa.int32(), nullable=False),
    ]
)
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int32(), nullable=False),
        pa.field("prompt_id", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("gold", pa.string(), nullable=False),
        pa.field("pred", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("judge_output", pa.string()),
    ]
)

# --- geometry (rgeom.activations, rgeom.geometry) ------------------------------------

# The scalar columns every activation table has; ``activation_schema`` appends the vector
# column, whose width depends on the model. Reading with this schema checks those columns.
ACTIVATION_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        # The prompt's baseline refusal score, log p_R - log(1 - p_R) at the last position
        # (interventions.refusal_score_from_logits), repeated on each of its rows. Null when
        # extraction ran without scores (carrier.filter_prompts off): the column is always
        # there, so readers need no second schema.
        pa.field("refusal_score", pa.float32(), nullable=True),
    ]
)
ACTIVATION_STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def activation_schema(d_model: int, dtype: str = "float32") -> pa.Schema:
    """The full activation-table schema for a model of width ``d_model`` (``dtype`` one of
    :data:`ACTIVATION_STORAGE_TYPES`)."""
    value = ACTIVATION_STORAGE_TYPES[dtype]
    return ACTIVATION_SCHEMA.append(pa.field("vector", pa.list_(value, d_model), nullable=False))


# The scalar columns of a direction table; ``direction_schema`` appends the two vector
# columns, whose width depends on the model. Reading with this schema checks those columns.
DIRECTION_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("n_harmful", pa.int32(), nullable=False),
        pa.field("n_harmless", pa.int32(), nullable=False),
        pa.field("norm", pa.float64(), nullable=False),
        pa.field("cos_prev_layer", pa.float64(), nullable=True),
    ]
)


def direction_schema(d_model: int) -> pa.Schema:
    vec = pa.list_(pa.float64(), d_model)
    schema = DIRECTION_SCHEMA
    schema = schema.insert(5, pa.field("direction", vec, nullable=False))
    return schema.insert(6, pa.field("unit", vec, nullable=False))


PROMPT_FILTER_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("refusal_score", pa.float64(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
    ]
)

# --- carrier search (rgeom.interventions) --------------------------------------------

# The scores every reader needs; tables written before the interval columns existed still
# read when checked against this part alone.
CARRIER_BASE_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("bypass", pa.float64()),
        pa.field("induce", pa.float64()),
        pa.field("kl", pa.float64()),
        pa.field("admissible", pa.bool_(), nullable=False),
        pa.field("is_carrier", pa.bool_(), nullable=False),
    ]
)
CARRIER_SCHEMA = pa.schema(
    [
        *CARRIER_BASE_SCHEMA,
        # Prompt-bootstrap percentile intervals of the three means (null where not evaluated
        # or carrier.n_boot is 0), and the validation prompts left after the prompt filter.
        pa.field("bypass_ci_low", pa.float64()),
        pa.field("bypass_ci_high", pa.float64()),
        pa.field("induce_ci_low", pa.float64()),
        pa.field("induce_ci_high", pa.float64()),
        pa.field("kl_ci_low", pa.float64()),
        pa.field("kl_ci_high", pa.float64()),
        pa.field("n_harmful", pa.int32()),
        pa.field("n_harmless", pa.int32()),
    ]
)

# --- interventions and cross-anchor transfer (rgeom.causal) --------------------------

INTERVENTION_SCHEMA = pa.schema(
    [
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        # none / ablation / addition / subspace_ablation
        pa.field("intervention", pa.string(), nullable=False),
        pa.field("coeff", pa.float64()),
        pa.field("k", pa.int16()),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("admissible", pa.bool_(), nullable=False),
        pa.field("carrier_source", pa.string(), nullable=False),
        pa.field("refusal_score_harmful", pa.float64()),
        pa.field("refusal_score_harmless", pa.float64()),
        pa.field("kl_harmless", pa.float64()),
        pa.field("ce_harmless", pa.float64()),
        pa.field("n_generate", pa.int32(), nullable=False),
        pa.field("refusal_rate", pa.float64()),
        pa.field("asr", pa.float64()),
        pa.field("refusal_rate_delta", pa.float64()),
        pa.field("asr_delta", pa.float64()),
        pa.field("n_utility", pa.int32(), nullable=False),
        pa.field("utility_accuracy", pa.float64()),
        pa.field("judge", pa.string(), nullable=False),
    ]
)

CROSS_SCHEMA = pa.schema(
    [
        # The model the direction is applied to (b) ...
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        # ... and the cell the direction comes from (a).
        pa.field("source_arm", pa.string(), nullable=False),
        pa.field("source_step", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("admissible", pa.bool_(), nullable=False),
        pa.field("carrier_source", pa.string(), nullable=False),
        # Cosine between a's direction and b's own direction at the same site.
        pa.field("cos_same_site", pa.float64()),
        pa.field("baseline_harmful", pa.float64()),
        pa.field("baseline_harmless", pa.float64()),
        pa.field("bypass", pa.float64()),
        pa.field("induce", pa.float64()),
        pa.field("kl", pa.float64()),
        pa.field("baseline_scores", pa.list_(pa.float64()), nullable=False),
        pa.field("bypass_scores", pa.list_(pa.float64()), nullable=False),
    ]
)

# --- drift across anchors (rgeom.drift) ----------------------------------------------

DRIFT_SCHEMA = pa.schema(
    [
        pa.field("arm", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("carrier_layer", pa.int16()),
        pa.field("carrier_position", pa.int16()),
        pa.field("n_admissible", pa.int32(), nullable=False),
        pa.field("ref_layer", pa.int16(), nullable=False),
        pa.field("ref_position", pa.int16(), nullable=False),
        pa.field("window_layers", pa.list_(pa.int16()), nullable=False),
        pa.field("erank_singular", pa.float64()),
        pa.field("erank_energy", pa.float64()),
        pa.field("erank_participation", pa.float64()),
        pa.field("erank_ci_low", pa.float64()),
        pa.field("erank_ci_high", pa.float64()),
        pa.field("erank_null_mean", pa.float64()),
        pa.field("erank_null_sd", pa.float64()),
        pa.field("null_kind", pa.string(), nullable=False),
        pa.field("angle_prev_deg", pa.float64()),
        pa.field("angle_step0_deg", pa.float64()),
        pa.field("angle_prev_ci_low", pa.float64()),
        pa.field("angle_prev_ci_high", pa.float64()),
        pa.field("angle_step0_ci_low", pa.float64()),
        pa.field("angle_step0_ci_high", pa.float64()),
        pa.field("cos_prev_same_layer", pa.float64()),
        # Label-shuffled null mean of every variant for the window stack (erank_null_mean
        # and _sd above are for drift.rank_kind).
        pa.field("erank_null_singular", pa.float64()),
        pa.field("erank_null_energy", pa.float64()),
        pa.field("erank_null_participation", pa.float64()),
        # Effective rank of the per-prompt contrast vectors at the reference (x_i minus the
        # harmless mean, harmful prompts), and its label-shuffled null mean.
        pa.field("erank_contrast_singular", pa.float64()),
        pa.field("erank_contrast_energy", pa.float64()),
        pa.field("erank_contrast_participation", pa.float64()),
        pa.field("erank_contrast_null_singular", pa.float64()),
        pa.field("erank_contrast_null_energy", pa.float64()),
        pa.field("erank_contrast_null_participation", pa.float64()),
        # Effective rank of the stack of bootstrap-resampled unit reference directions, and
        # of an equally tall stack of label-shuffled ones.
        pa.field("erank_boot_singular", pa.float64()),
        pa.field("erank_boot_energy", pa.float64()),
        pa.field("erank_boot_participation", pa.float64()),
        pa.field("erank_boot_null_singular", pa.float64()),
        pa.field("erank_boot_null_energy", pa.float64()),
        pa.field("erank_boot_null_participation", pa.float64()),
        # Angle calibration (see rgeom.drift's docstring): this cell's bootstrap-noise angle, and
        # for each angle above the pair's combined noise angle and angle / noise.
        pa.field("boot_angle_deg", pa.float64()),
        pa.field("angle_prev_noise_deg", pa.float64()),
        pa.field("angle_prev_ratio", pa.float64()),
        pa.field("angle_step0_noise_deg", pa.float64()),
        pa.field("angle_step0_ratio", pa.float64()),
    ]
)

ANGLES_SCHEMA = pa.schema(
    [
        pa.field("arm_a", pa.string(), nullable=False),
        pa.field("step_a", pa.int32(), nullable=False),
        pa.field("arm_b", pa.string(), nullable=False),
        pa.field("step_b", pa.int32(), nullable=False),
        # prev: b is a's previous anchor; step0: b is the base; arm: same step, other arm.
        pa.field("relation", pa.string(), nullable=False),
        # carrier: the 1-D span of the reference direction; window: top-k SVD of the stack.
        pa.field("basis", pa.string(), nullable=False),
        pa.field("k", pa.int16(), nullable=False),
        pa.field("index", pa.int16(), nullable=False),
        pa.field("angle_deg", pa.float64()),
        # Calibration against the within-checkpoint bootstrap: the pair's noise angle at this
        # index, angle / noise and angle - noise (null without activation tables).
        pa.field("noise_deg", pa.float64()),
        pa.field("ratio", pa.float64()),
        pa.field("excess_deg", pa.float64()),
    ]
)

VERDICT_SCHEMA = pa.schema(
    [
        pa.field("arm", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("statistic", pa.float64()),
        pa.field("detail", pa.string(), nullable=False),
        # cross_anchor: decided by the transfer test; geometry: carrier layers and angles.
        pa.field("basis", pa.string(), nullable=False),
        # Share of the last anchor's own bypass effect that step 0's direction achieves
        # there, with its paired prompt-bootstrap interval (see rgeom.causal.transfer).
        pa.field("transfer", pa.float64()),
        pa.field("transfer_ci_low", pa.float64()),
        pa.field("transfer_ci_high", pa.float64()),
        # Both directions of the transfer test are admissible carriers (not fallbacks).
        pa.field("admissible", pa.bool_()),
    ]
)
