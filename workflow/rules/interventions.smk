# Issue #5: causal interventions at each cell's carrier, the cross-anchor transfer test
# (read by the drift rule's verdict) and one summary job with a frontier figure per arm.


rule interventions:
    input:
        model=model_dir,
        directions="results/{arm}/step-{step}/directions.parquet",
        carriers="results/{arm}/step-{step}/carriers.parquet",
        activations="results/{arm}/step-{step}/activations.parquet",
        val_harmful="results/data/val_harmful.parquet",
        val_harmless="results/data/val_harmless.parquet",
        generate_set=lambda w: interventions_set("generate_set"),
        utility_set=lambda w: interventions_set("utility_set"),
    output:
        table="results/{arm}/step-{step}/interventions.parquet",
    log:
        "results/logs/interventions/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/interventions/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    params:
        # The configured judge scores the generations' refusal rate and ASR; its bootstrap
        # count and batch size change no label here, so they rerun nothing
        # (stage_params.judge_params).
        json=untracked(lambda w: interventions_params(w)),
        key=lambda w: interventions_params(w, perf=False),
    shell:
        "rgeom interventions --model {input.model} --directions {input.directions}"
        " --carriers {input.carriers} --activations {input.activations}"
        " --val-harmful {input.val_harmful} --val-harmless {input.val_harmless}"
        " --generate-set {input.generate_set} --utility-set {input.utility_set}"
        " --out {output.table} --params {params.json:q} > {log} 2>&1"


rule cross_anchor:
    input:
        model=model_dir,
        directions=lambda w: [
            f"results/{a}/step-{s}/directions.parquet"
            for a, s in cross_anchor_sources(w)
        ],
        carriers=lambda w: [
            f"results/{a}/step-{s}/carriers.parquet"
            for a, s in cross_anchor_sources(w)
        ],
        val_harmful="results/data/val_harmful.parquet",
        val_harmless="results/data/val_harmless.parquet",
    output:
        table="results/{arm}/step-{step}/cross_anchor.parquet",
    log:
        "results/logs/cross_anchor/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/cross_anchor/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        json=lambda w: stage_params.carrier_params(config, w.arm, int(w.step)),
    shell:
        "rgeom cross-anchor --model {input.model} --directions {input.directions}"
        " --carriers {input.carriers} --val-harmful {input.val_harmful}"
        " --val-harmless {input.val_harmless} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


rule interventions_summary:
    input:
        tables=cell_paths("results/{arm}/step-{step}/interventions.parquet"),
    output:
        table="results/interventions/interventions.parquet",
        frontiers=expand("results/interventions/frontier_{arm}.png", arm=config["arms"]),
    log:
        "results/logs/interventions_summary.log",
    benchmark:
        "results/benchmarks/interventions_summary.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=stage_params.interventions_summary_params(config),
    shell:
        "rgeom interventions-summary --tables {input.tables}"
        " --out-dir results/interventions --params {params.json:q} > {log} 2>&1"
