# rgeom: how safety fine-tuning reorganizes refusal geometry.
# Thin on purpose: helpers live in workflow/rules/common.smk, logic in the rgeom package.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/attacks.smk"
include: "workflow/rules/behaviour.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/utility.smk"
include: "workflow/rules/geometry.smk"
include: "workflow/rules/carriers.smk"
include: "workflow/rules/interventions.smk"
include: "workflow/rules/report.smk"


onstart:
    # Under the SLURM executor, before the first sbatch: every job's partition and resources
    # must fit what sinfo reports (rgeom.profiles; `rgeom check-profile` runs it by hand).
    check_slurm_resources(workflow)


rule all:
    default_target: True
    input:
        summary_outputs(),
        drift_outputs(),
        validation_outputs(),
        interventions_outputs(),
