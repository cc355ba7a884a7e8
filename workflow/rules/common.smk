# Helpers shared by every rule: config validation, the (arm, step) grid, paths and inputs.
# No research decisions here: which config keys a job's results depend on (so which edits
# rerun it) is rgeom.stage_params, the results layout is rgeom.layout; these call them.
import hashlib
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rgeom.config import dataset_file, validate
from rgeom.errors import RgeomError
from rgeom.io import file_sha256
from rgeom import layout
from rgeom.layout import BASE
from rgeom import stage_params

try:
    config.update(
        validate(
            config,
            source=", ".join(
                map(str, workflow.overwrite_configfiles or workflow.configfiles)
            ),
        )
    )
except RgeomError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None


wildcard_constraints:
    arm="[a-z0-9]+",
    step=r"\d{6}",
    benchmark="[A-Za-z0-9_]+",
    # Only configured set names, so results/data/sft_train.parquet is never a "set".
    dataset="|".join(sorted(config["data"]["sets"])),


# The rules call the `rgeom` console script. Snakemake started as .venv/bin/snakemake
# without the venv activated must still find it: the interpreter's bin folder goes last
# on PATH, so an activated venv or a conda env (--sdm conda) still comes first.
os.environ.update(
    PATH=os.pathsep.join([*os.get_exec_path(), str(Path(sys.executable).parent)])
)

GPU = 1 if config["model"]["device"] == "cuda" else 0
TRAIN_GPUS = config["train"]["num_gpus"] if GPU else 0


def tag(step):
    return layout.step_tag(step)


def trained_tags():
    return [tag(s) for s in config["anchors"] if s > 0]


def cells():
    """Every (arm, step tag) measured: the base once, then each arm at each trained anchor."""
    return [
        (arm, tag(step))
        for arm, step in layout.cells(config["arms"], config["anchors"])
    ]


def cell_paths(pattern):
    return [pattern.format(arm=arm, step=step) for arm, step in cells()]


def model_dir(wildcards):
    return str(layout.model_dir(wildcards.arm, int(wildcards.step)))


def params_json(**sections):
    return stage_params.params_json(config, **sections)


def untracked(func):
    """A params function whose value reaches the stage but never triggers a rerun.

    Snakemake does not track a "derived" param, one whose function takes ``input`` (see
    snakemake.rules.Rule._is_deriving_function). A rule pairs it with a tracked ``key``
    param holding every setting that changes its output, so memory and speed knobs, and the
    folder shared files are read from, rerun nothing.
    """

    def derived(wildcards, input):
        return func(wildcards)

    return derived


_DIGESTS = {}


def content_key(paths):
    """{path as the config names it: sha256 of the file} for files under data.shared_dir.

    Tracked instead of the files themselves: an input's path is part of Snakemake's record,
    so moving the same files (another data.shared_dir, a new mount) would rerun everything
    downstream, while their contents are what the results depend on. Hashes are cached per
    (path, size, mtime) for the DAG build.
    """
    out = {}
    for rel in paths:
        path = Path(shared_path(rel))
        if not path.is_file():
            raise WorkflowError(
                f"missing file: {path} (named {rel!r} in the config, under data.shared_dir "
                f"{config['data']['shared_dir']!r})"
            )
        stat = path.stat()
        cache = (str(path), stat.st_size, stat.st_mtime_ns)
        if cache not in _DIGESTS:
            _DIGESTS[cache] = file_sha256(path)
        out[str(rel)] = _DIGESTS[cache]
    return out


# --- Arditi's prompt filter, decided once on the source model (workflow/rules/geometry.smk) ---

PROMPT_FILTER = "results/prompt_filter.parquet"


def filter_on():
    return config["carrier"]["filter_prompts"]


def prompt_filter_input():
    """Arditi's prompt filter, decided once on the source model for every cell."""
    return {"prompt_filter": PROMPT_FILTER} if filter_on() else {}


def prompt_filter_arg(input):
    return f"--prompt-filter {input.prompt_filter}" if filter_on() else ""


def dataset_files(dataset):
    """The shared file a set is read from ([] for builtin and hub sets)."""
    spec = config["data"]["sets"][dataset]
    return [] if dataset_file(spec, ".") is None else [spec["path"]]


def prepare_data_params(wildcards, tracked=False):
    """The set's spec; tracked, the content of its file instead of data.shared_dir."""
    source = content_key(dataset_files(wildcards.dataset)) if tracked else None
    return stage_params.prepare_data_params(config, wildcards.dataset, source)


def config_digest():
    """record_config's params: a hash of the validated config, short in a dry run's reason."""
    return hashlib.sha256(params_json(**config).encode()).hexdigest()[:16]


SUMMARY_STAGING = "results/staging/summary"


def summary_labels():
    """publish_summary's params, shown beside every figure and table of the HTML report."""
    return {
        "arms": " / ".join(config["arms"]),
        "anchors": " / ".join(map(str, config["anchors"])),
        "benchmarks": " / ".join(config["benchmarks"]),
        "model": config["model"]["path"] or config["model"]["source"],
        "config": config_digest(),
    }


def summary_outputs():
    figures = REPORT_FIGURES + [f"frontier_{arm}" for arm in config["arms"]]
    return [
        "results/config.json",
        "results/summary/summary.parquet",
        "results/summary/summary.csv",
        "results/summary/summary.md",
        *(f"results/summary/tables/{t}.{ext}" for t in TABLES for ext in TABLE_FORMATS),
        *(
            f"results/summary/figures/{f}.{ext}"
            for f in figures
            for ext in ("png", "svg")
        ),
    ]


# --- the HTML report (workflow/rules/report.smk) ---

from rgeom.report import REPORT_FIGURES as _REPORT_FIGURES
from rgeom.tables import TABLE_NAMES as TABLES

REPORT_FIGURES = list(_REPORT_FIGURES)
# .html is what the Snakemake report shows inline; the rest are for papers and scripts.
TABLE_FORMATS = ("html", "parquet", "csv", "md", "tex")


def report_figure(name, category, label):
    """A summary figure flagged for the HTML report, captioned by report/{name}.rst
    (frontier_{arm} share report/frontier.rst)."""
    caption = "frontier" if name.startswith("frontier_") else name
    return report(
        f"results/summary/figures/{name}.png",
        caption=f"../report/{caption}.rst",
        category=category,
        labels={"figure": label},
    )


def report_table(name, label):
    return report(
        f"results/summary/tables/{name}.html",
        caption=f"../report/table_{name}.rst",
        category="Tables",
        labels={"table": label},
    )


def report_table_files():
    return [
        f"results/summary/tables/{t}.{ext}"
        for t in TABLES
        for ext in TABLE_FORMATS
        if ext != "html"
    ]


def drift_outputs():
    return [
        "results/drift/drift.parquet",
        "results/drift/angles.parquet",
        "results/drift/verdict.parquet",
        "results/drift/cross_anchor.parquet",
        "results/drift/figures/carrier_layer_vs_step.png",
        "results/drift/figures/principal_angles.png",
    ]


def interventions_outputs():
    return [
        "results/interventions/interventions.parquet",
        *(f"results/interventions/frontier_{arm}.png" for arm in config["arms"]),
    ]


def interventions_set(key):
    # config.validate checked that the name is a set in data.sets.
    return f"results/data/{config['interventions'][key]}.parquet"


def cross_anchor_sources(wildcards):
    """Every cell whose direction is applied to this one: the base and the same arm's
    anchors; for the base itself, every cell."""
    return [
        (arm, step)
        for arm, step in cells()
        if wildcards.arm == BASE or arm in (BASE, wildcards.arm)
    ]


def shared_path(path):
    path = Path(path)
    return str(
        path if path.is_absolute() else Path(config["data"]["shared_dir"]) / path
    )


def r2d2_files():
    return stage_params.r2d2_files(config)


def r2d2_inputs():
    """The pool's workflow-made input: train_harmful when no shared files are named (shared
    files are tracked by content in train_params, not as inputs)."""
    if r2d2_files()["r2d2_behaviours"]:
        return {}
    return {"r2d2_behaviours": "results/data/train_harmful.parquet"}


def deepspeed_config():
    offload = "_offload" if config["train"]["offload"] else ""
    # Relative to the Snakefile, so runs with --directory elsewhere still find it.
    name = f"zero{config['train']['zero_stage']}{offload}.json"
    return str(Path(workflow.basedir) / "workflow" / "deepspeed" / name)


def previous_anchor(step):
    """The trained anchor before ``step`` (None for the first)."""
    earlier = [s for s in config["anchors"] if 0 < s < step]
    return max(earlier) if earlier else None


def train_inputs(wildcards):
    inputs = {"model": "results/model/base", "data": "results/data/sft_train.parquet"}
    previous = previous_anchor(int(wildcards.step))
    if previous is not None:
        # Orders the segments: this one resumes from the state the previous one saved.
        inputs["previous"] = f"results/{wildcards.arm}/checkpoints/step-{tag(previous)}"
    if wildcards.arm == "r2d2":
        inputs.update(r2d2_inputs())
    if config["train"]["zero_stage"]:
        inputs["deepspeed"] = deepspeed_config()
    return inputs


def train_params(wildcards):
    sections = stage_params.train_params(config, wildcards.arm, int(wildcards.step))
    if wildcards.arm == "r2d2":
        files = r2d2_files()
        sections["r2d2_files"] = content_key(
            files["r2d2_behaviours"] + files["r2d2_targets"]
        )
    return params_json(**sections)


def train_launcher(wildcards, resources):
    from rgeom.slurm_rank import launcher

    keys = ("mpi", "tasks")
    found = {k: getattr(resources, k) for k in keys if k in resources.keys()}
    return launcher(found, config["train"]["num_gpus"])


def arm_checkpoints(wildcards):
    return [f"results/{wildcards.arm}/checkpoints/step-{t}" for t in trained_tags()]


def extra_flags(wildcards, input):
    """``--extra NAME=PATH`` per extra input; several files join with "," (one NAME each).
    The R2D2 pool's shared files come from the config (tracked by content, not path)."""
    paths = {
        n: stage_params.as_list(input[n])
        for n in ("r2d2_behaviours", "deepspeed")
        if n in input.keys()
    }
    if wildcards.arm == "r2d2":
        for name, files in r2d2_files().items():
            if files:
                paths[name] = [shared_path(f) for f in files]
    order = ("r2d2_behaviours", "r2d2_targets", "deepspeed")
    return " ".join(f"--extra {n}={','.join(paths[n])}" for n in order if n in paths)


# --- attacks (workflow/rules/attacks.smk) ---

ATTACKS = config["attacks"]


def attacks_active():
    return ATTACKS["enabled"] and ATTACKS["benchmark"] in config["benchmarks"]


def attack_behaviours():
    return f"results/data/{ATTACKS['benchmark']}.parquet"


def generate_prompts(wildcards):
    """The generate job's prompts: the attack test cases for the attack benchmark."""
    if attacks_active() and wildcards.benchmark == ATTACKS["benchmark"]:
        return "results/attacks/test_cases.parquet"
    return f"results/data/{wildcards.benchmark}.parquet"


def attack_source():
    """(model path passed to the stage, whether it is a file input of the job)."""
    source = ATTACKS["source_model"]
    if not source:
        return "results/model/base", True
    return source, Path(source).exists()


def gcg_targets():
    """The GCG targets file as the config names it ([] when the set's column is used);
    tracked by content (targets_key), passed by targets_flag, never a path input."""
    targets = ATTACKS["gcg"]["targets"]
    return [targets] if targets else []


def targets_key():
    return content_key(gcg_targets())


def targets_flag():
    return " ".join(f"--targets {shared_path(t)}" for t in gcg_targets())


def attack_inputs(wildcards):
    inputs = {"behaviors": attack_behaviours()}
    if wildcards.method == "Templates" and ATTACKS["templates"]["file"]:
        inputs["templates"] = ATTACKS["templates"]["file"]
    return inputs


def attack_gcg_inputs(wildcards):
    inputs = {"behaviors": attack_behaviours()}
    path, is_file = attack_source()
    if is_file:
        inputs["model"] = path
    return inputs


def gcg_chunks():
    """GCG-transfer's chunk files: one SLURM job each (attacks.gcg.jobs)."""
    n = ATTACKS["gcg"]["jobs"]
    return [f"results/attacks/GCG-transfer/chunk-{k}.parquet" for k in range(n)]


def gcg_params(chunk=None):
    targets = targets_key() if chunk is not None else None
    return stage_params.gcg_params(config, chunk, targets)


def attack_autodan_inputs(wildcards):
    """AutoDAN: GCG-transfer's inputs, plus its own prototypes file when one is set."""
    inputs = attack_gcg_inputs(wildcards)
    if ATTACKS["autodan"]["prototypes"]:
        inputs["templates"] = ATTACKS["autodan"]["prototypes"]
    return inputs


def attack_params(wildcards):
    return stage_params.attack_params(config, wildcards.method)


def optional_flags(input, *names):
    """``--NAME PATH`` per named input present; ``targets`` is the GCG targets file."""
    flags = [f"--{n} {input[n]}" for n in names if n in input.keys()]
    if "targets" in names:
        flags.append(targets_flag())
    return " ".join(f for f in flags if f)


def adaptive_inputs(wildcards):
    return {
        "model": model_dir(wildcards),
        "behaviors": attack_behaviours(),
    }


def adaptive_params(wildcards):
    return stage_params.adaptive_params(
        config, wildcards.arm, int(wildcards.step), targets_key()
    )


def adaptive_generate_params(wildcards, perf=True):
    return stage_params.adaptive_generate_params(
        config, wildcards.arm, int(wildcards.step), wildcards.attack, perf
    )


def generate_params(wildcards, perf=True):
    return stage_params.generate_params(
        config, wildcards.arm, int(wildcards.step), wildcards.benchmark, perf
    )


def adaptive_judge_inputs(wildcards):
    """The completions; with a model judge also the behaviours it reads and its files."""
    cell = f"results/{wildcards.arm}/step-{wildcards.step}"
    inputs = {"completions": f"{cell}/adaptive_{wildcards.attack}_completions.parquet"}
    if model_judges():
        inputs["prompts"] = attack_behaviours()
        inputs.update(judge_model_files())
    elif config["judge"]["harmbench"] == "harmfulness_judge":
        # It reads the behaviour itself, not the adversarial prompt around it.
        inputs["prompts"] = attack_behaviours()
    return inputs


def adaptive_autodan_inputs(wildcards):
    """Adaptive AutoDAN: adaptive GCG's inputs, plus AutoDAN's prototypes file when set."""
    inputs = adaptive_inputs(wildcards)
    if ATTACKS["autodan"]["prototypes"]:
        inputs["templates"] = ATTACKS["autodan"]["prototypes"]
    return inputs


def adaptive_autodan_params(wildcards):
    return stage_params.adaptive_autodan_params(
        config, wildcards.arm, int(wildcards.step)
    )


def adaptive_metrics():
    """Per-cell adaptive-attack metrics for the summary (empty when disabled)."""
    if not ATTACKS["adaptive"]["enabled"]:
        return []
    return [
        f"results/{arm}/step-{step}/adaptive_{method}_metrics.parquet"
        for method in ATTACKS["adaptive"]["methods"]
        for arm, step in cells()
    ]


def cell_files(pattern, **values):
    """``pattern`` under one cell's folder, expanded over ``values``; {arm} and {step}
    stay wildcards (the per-cell metrics rules)."""
    return expand(f"results/{{{{arm}}}}/step-{{{{step}}}}/{pattern}", **values)


def interventions_params(w, perf=True):
    return stage_params.interventions_params(config, w.arm, int(w.step), perf)


def model_judges():
    return stage_params.model_judges(config)


def judge_model_files(judges=None):
    """Local judge model and adapter directories (hub ids are not files Snakemake tracks)."""
    files = {}
    for name, spec in (model_judges() if judges is None else judges).items():
        for key in ("path", "adapter"):
            if spec[key] and Path(spec[key]).expanduser().exists():
                files[f"{name}_{key}"] = str(Path(spec[key]).expanduser())
    return files


def judge_inputs(wildcards):
    """The judge job's inputs: the prompt set and judge models only when a model judge runs."""
    cell = f"results/{wildcards.arm}/step-{wildcards.step}"
    inputs = {"generations": f"{cell}/generations/{wildcards.benchmark}.parquet"}
    if model_judges():
        inputs["prompts"] = f"results/data/{wildcards.benchmark}.parquet"
        inputs.update(judge_model_files())
    elif config["judge"]["harmbench"] == "harmfulness_judge":
        # It reads the behaviour itself, not the attack's prompt around it.
        inputs["prompts"] = f"results/data/{wildcards.benchmark}.parquet"
    return inputs


def judge_gpu():
    """1 when a configured judge model runs on CUDA (explicitly, or auto on a GPU config)."""
    devices = [spec["device"] for spec in model_judges().values()]
    return int(any(d == "cuda" or (d == "auto" and GPU) for d in devices))


def validation_outputs():
    if not config["validate"]["enabled"]:
        return []
    return [
        f"results/validation/judge_{name}"
        for name in ("agreement.parquet", "confusion.parquet", "predictions.parquet")
    ] + ["results/validation/judge_validation.md"]


def utility_shift_outputs():
    if not config["utility_shift"]["enabled"]:
        return []
    return cell_paths("results/{arm}/step-{step}/utility_shift.parquet")


def check_slurm_resources(workflow):
    """onstart (Snakefile): with --executor slurm, fail before the first submission when a
    job's partition is unknown to SLURM or its resources exceed the partition's limits.
    """
    from rgeom.profiles import check_workflow_jobs

    try:
        check_workflow_jobs(workflow)
    except RgeomError as exc:
        raise WorkflowError(f"SLURM profile: {exc}") from None


def validate_files():
    """{labelled, prompts}: the validation files under data.shared_dir the config names."""
    spec = config["validate"]
    files = {}
    if not spec["labelled"].startswith("builtin:"):
        files["labelled"] = spec["labelled"]
    if spec["prompts"]:
        files["prompts"] = spec["prompts"]
    return files


def validate_inputs(wildcards):
    """Local judge model folders (the shared files are tracked by content: validate_files)."""
    # Only the judges that label validation tasks (HarmBench classifier, XSTest judge).
    judges = {
        k: v
        for k, v in model_judges().items()
        if k in ("harmbench_classifier", "xstest_llm")
    }
    return judge_model_files(judges)
