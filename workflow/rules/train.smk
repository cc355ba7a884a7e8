# One job per (arm, anchor): each resumes from the state the previous anchor's job saved in
# results/{arm}/train_state/ (outside Snakemake's outputs, so reruns keep it) and stops at its
# own anchor. A later anchor adds one job per arm; earlier checkpoints stay up to date.


rule train:
    input:
        unpack(train_inputs),
    output:
        checkpoint=directory("results/{arm}/checkpoints/step-{step}"),
    log:
        "results/logs/train/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/train/{arm}-{step}.tsv"
    # The training chain (one segment per anchor, each waiting for the last) is the longest
    # path of the DAG: run a ready segment before any ready cell job, or the last anchor's
    # cells start late and the run ends on a serial tail.
    priority: 50
    conda:
        "../envs/train.yaml"
    # One thread: on a few CPU cores a 2-thread segment holds every core, so no cell job
    # runs beside it and the demo's training ran alone for 280 of its 990 s. One thread per
    # job keeps both cores busy. GPU jobs take their CPUs from cpus_per_gpu (profiles/slurm).
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=TRAIN_GPUS,
        # Resources, not params: when state is saved changes no result, so changing it
        # must not rerun the segments.
        save_every=config["train"]["save_every"],
        # Whole seconds: Snakemake keeps resources as integers.
        save_margin_s=int(config["train"]["save_margin_s"]),
    params:
        json=train_params,
        extra=extra_flags,
        # torchrun on one node; srun + rgeom.slurm_rank under the SLURM plugin's mpi route
        # (docs/cluster.md). Derived from resources: a launcher never reruns a segment.
        launcher=train_launcher,
    shell:
        "{params.launcher} train --arm {wildcards.arm} --model {input.model}"
        " --data {input.data} --out-dir results/{wildcards.arm}/checkpoints"
        " --state-dir results/{wildcards.arm}/train_state"
        # Under SLURM the run saves resume state and stops train.save_margin_s before its
        # time limit (docs/training.md).
        " --time-limit-min {resources.runtime} --save-every {resources.save_every}"
        " --save-margin-s {resources.save_margin_s}"
        " {params.extra} --params {params.json:q} > {log} 2>&1"


rule train_log:
    input:
        checkpoints=arm_checkpoints,
    output:
        table="results/{arm}/train_log.parquet",
    log:
        "results/logs/train_log/{arm}.log",
    benchmark:
        "results/benchmarks/train_log/{arm}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        json=params_json(),
    shell:
        "rgeom train-log --arm {wildcards.arm}"
        " --state-dir results/{wildcards.arm}/train_state --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"
