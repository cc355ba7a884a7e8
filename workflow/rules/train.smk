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
