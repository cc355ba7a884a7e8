rule prepare_model:
    output:
        model=directory("results/model/base"),
    log:
        "results/logs/prepare_model.log",
    benchmark:
        "results/benchmarks/prepare_model.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        json=stage_params.prepare_model_params(config),
    shell:
        "rgeom prepare-model --out {output.model} --params {params.json:q} > {log} 2>&1"
