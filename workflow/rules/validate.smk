# Judge validation: the configured judge scores a human-labelled (prompt, response, label)
# file; accuracy, Cohen's kappa and the confusion matrix land in results/validation/.


rule validate_judges:
    input:
        unpack(validate_inputs),
    output:
        agreement="results/validation/judge_agreement.parquet",
        confusion="results/validation/judge_confusion.parquet",
        predictions="results/validation/judge_predictions.parquet",
        markdown="results/validation/judge_validation.md",
    log:
        "results/logs/validate_judges.log",
    benchmark:
        "results/benchmarks/validate_judges.tsv"
    conda:
        # Model judges need torch, transformers and peft.
        "../envs/train.yaml" if model_judges() else "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=40000 if model_judges() else 1000,
        runtime=60 if model_judges() else 5,
        gpu=judge_gpu(),
    params:
        # judge.bootstrap sizes no interval here and judge.batch_size only sizes batches:
        # neither reruns the validation.
        json=untracked(lambda w: stage_params.validate_params(config)),
        # Evaluated only when the job is in the DAG: a disabled validation needs no files.
        key=lambda w: [
            content_key(validate_files().values()),
            stage_params.validate_params(config, perf=False),
        ],
        labelled=untracked(
            lambda w: (
                shared_path(validate_files().get("labelled"))
                if "labelled" in validate_files()
                else config["validate"]["labelled"]
            )
        ),
        prompts=untracked(
            lambda w: (
                f"--prompts {shared_path(validate_files()['prompts'])}"
                if "prompts" in validate_files()
                else ""
            )
        ),
    shell:
        "rgeom validate-judge --labelled {params.labelled} {params.prompts}"
        " --agreement {output.agreement} --confusion {output.confusion}"
        " --predictions {output.predictions} --markdown {output.markdown}"
        " --params {params.json:q} > {log} 2>&1"
