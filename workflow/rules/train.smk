def train_inputs(wildcards):
    inputs = {"model": "results/model/base", "data": "results/data/sft_train.parquet"}
    if wildcards.arm == "r2d2":
        inputs.update(r2d2_inputs())
    if config["train"]["zero_stage"]:
        inputs["deepspeed"] = deepspeed_config()
    return inputs


def train_params(wildcards):
    sections = {
        "model": model_params(),
        "train": config["train"],
        "anchors": config["anchors"],
    }
    if wildcards.arm == "r2d2":
        # Only the r2d2 arm sees these, so tuning R2D2 never retrains the SFT arm.
        sections["r2d2"] = {
            k: v
            for k, v in config["r2d2"].items()
            if k not in ("behaviours", "targets")
        }
    return params_json(**sections)


def extra_flags(wildcards, input):
    names = ("r2d2_behaviours", "r2d2_targets", "deepspeed")
    return " ".join(f"--extra {n}={input[n]}" for n in names if n in input.keys())


rule train:
    input:
        unpack(train_inputs),
    output:
        checkpoints=[
            directory(f"results/{{arm}}/checkpoints/step-{t}") for t in trained_tags()
        ],
        log_table="results/{arm}/train_log.parquet",
    log:
        "results/logs/train/{arm}.log",
    benchmark:
        "results/benchmarks/train/{arm}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=TRAIN_GPUS,
    params:
        json=train_params,
        extra=extra_flags,
        launcher=(
            f"torchrun --standalone --nproc_per_node {config['train']['num_gpus']} -m rgeom.cli"
            if config["train"]["num_gpus"] > 1
            else "rgeom"
        ),
    shell:
        "{params.launcher} train --arm {wildcards.arm} --model {input.model}"
        " --data {input.data} --out-dir results/{wildcards.arm}/checkpoints"
        " --state-dir results/{wildcards.arm}/train_state --log-table {output.log_table}"
        " {params.extra} --params {params.json:q} > {log} 2>&1"
