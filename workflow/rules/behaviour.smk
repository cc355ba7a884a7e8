rule generate:
    input:
        model=model_dir,
        prompts="results/data/{benchmark}.parquet",
    output:
        table="results/{arm}/step-{step}/generations/{benchmark}.parquet",
    log:
        "results/logs/generate/{arm}-{step}-{benchmark}.log",
    benchmark:
        "results/benchmarks/generate/{arm}-{step}-{benchmark}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        json=lambda w: params_json(
            model=model_params(),
            generate=config["generate"],
            arm=w.arm,
            step=int(w.step),
            benchmark=w.benchmark,
        ),
    shell:
        "rgeom generate --model {input.model} --prompts {input.prompts}"
        " --out {output.table} --params {params.json:q} > {log} 2>&1"


rule judge:
    input:
        generations="results/{arm}/step-{step}/generations/{benchmark}.parquet",
    output:
        labels="results/{arm}/step-{step}/judgements/{benchmark}.parquet",
        metrics="results/{arm}/step-{step}/metrics/{benchmark}.parquet",
    log:
        "results/logs/judge/{arm}-{step}-{benchmark}.log",
    benchmark:
        "results/benchmarks/judge/{arm}-{step}-{benchmark}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        json=params_json(judge=config["judge"]),
    shell:
        "rgeom judge --generations {input.generations} --labels {output.labels}"
        " --metrics {output.metrics} --params {params.json:q} > {log} 2>&1"
