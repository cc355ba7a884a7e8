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
    # The geometry chain (extract -> directions -> carriers) is each cell's longest path
    # after training: start a ready link before generation, judging or attacks, which fill
    # the gaps. Ran last, the carrier search held one core alone for the demo's final minute.
    priority: 40
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        json=lambda w: stage_params.extract_params(config, w.arm, int(w.step), BASE),
        sets=lambda w, input: " ".join(f"--set {n}={input[n]}" for n in DIRECTION_SETS),
    shell:
        "rgeom extract --model {input.model} {params.sets} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


rule prompt_filter:
    input:
        activations=f"results/{BASE}/step-{tag(0)}/activations.parquet",
    output:
        table=PROMPT_FILTER,
    log:
        "results/logs/prompt_filter.log",
    benchmark:
        "results/benchmarks/prompt_filter.tsv"
    # The geometry chain's next link (see rule extract_activations).
    priority: 40
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=stage_params.prompt_filter_params(config),
    shell:
        "rgeom prompt-filter --activations {input.activations} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


rule directions:
    input:
        unpack(lambda w: prompt_filter_input()),
        activations="results/{arm}/step-{step}/activations.parquet",
    output:
        table="results/{arm}/step-{step}/directions.parquet",
    log:
        "results/logs/directions/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/directions/{arm}-{step}.tsv"
    # The geometry chain's next link (see rule extract_activations).
    priority: 40
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=params_json(),
        prompt_filter=lambda w, input: prompt_filter_arg(input),
    shell:
        "rgeom directions --activations {input.activations} --out {output.table}"
        " {params.prompt_filter} --params {params.json:q} > {log} 2>&1"
