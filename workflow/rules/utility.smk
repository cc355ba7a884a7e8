# Benign-utility audit: each checkpoint's cross-entropy on, and KL(base || checkpoint) over,
# the base model's greedy answers to the harmless prompts of utility_shift.benchmarks.


rule utility_shift:
    input:
        model=model_dir,
        base="results/model/base",
        reference=expand(
            "results/{base}/step-{step}/generations/{benchmark}.parquet",
            base=BASE,
            step=tag(0),
            benchmark=config["utility_shift"]["benchmarks"],
        ),
    output:
        table="results/{arm}/step-{step}/utility_shift.parquet",
    log:
        "results/logs/utility_shift/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/utility_shift/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    params:
        json=lambda w: stage_params.utility_shift_params(config, w.arm, int(w.step)),
    shell:
        "rgeom utility-shift --model {input.model} --base {input.base}"
        " --reference {input.reference} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"
