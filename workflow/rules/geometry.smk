DIRECTION_SETS = ("dir_harmful", "dir_harmless", "val_harmful", "val_harmless")


rule extract_activations:
    input:
        **{name: f"results/data/{name}.parquet" for name in DIRECTION_SETS},
        model=model_dir,
    output:
        table="results/{arm}/step-{step}/activations.parquet",
    log:
        "results/logs/extract_activations/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/extract_activations/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        json=lambda w: params_json(
            model=model_params(),
            activations=config["activations"],
            # Whether baseline refusal scores are stored for the directions' prompt filter.
            carrier=direction_filter(scores_only=True),
            arm=w.arm,
            step=int(w.step),
        ),
        sets=lambda w, input: " ".join(f"--set {n}={input[n]}" for n in DIRECTION_SETS),
    shell:
        "rgeom extract --model {input.model} {params.sets} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


rule directions:
    input:
        activations="results/{arm}/step-{step}/activations.parquet",
    output:
        table="results/{arm}/step-{step}/directions.parquet",
    log:
        "results/logs/directions/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/directions/{arm}-{step}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=params_json(carrier=direction_filter()),
    shell:
        "rgeom directions --activations {input.activations} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"
