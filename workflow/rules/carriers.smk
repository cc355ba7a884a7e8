# Issue #5: the causal carrier search per cell, then one drift job over all cells.


rule carriers:
    input:
        unpack(lambda w: prompt_filter_input()),
        model=model_dir,
        directions="results/{arm}/step-{step}/directions.parquet",
        # Per-prompt contrasts span the rank-k carriers (as in the interventions stage).
        activations="results/{arm}/step-{step}/activations.parquet",
        val_harmful="results/data/val_harmful.parquet",
        val_harmless="results/data/val_harmless.parquet",
    output:
        table="results/{arm}/step-{step}/carriers.parquet",
    log:
        "results/logs/carriers/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/carriers/{arm}-{step}.tsv"
    # The geometry chain's next link (see rule extract_activations).
    priority: 40
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    params:
        json=lambda w: stage_params.carrier_params(config, w.arm, int(w.step)),
        prompt_filter=lambda w, input: prompt_filter_arg(input),
    shell:
        "rgeom carriers --model {input.model} --directions {input.directions}"
        " --val-harmful {input.val_harmful} --val-harmless {input.val_harmless}"
        " --activations {input.activations} --out {output.table} {params.prompt_filter}"
        " --params {params.json:q} > {log} 2>&1"


rule drift:
    input:
        directions=cell_paths("results/{arm}/step-{step}/directions.parquet"),
        carriers=cell_paths("results/{arm}/step-{step}/carriers.parquet"),
        # Per-prompt activations give the label-shuffled null of the effective rank.
        activations=cell_paths("results/{arm}/step-{step}/activations.parquet"),
        # Every cell's directions applied to every same-arm cell: the verdict's transfer test.
        cross_anchor=cell_paths("results/{arm}/step-{step}/cross_anchor.parquet"),
    output:
        drift="results/drift/drift.parquet",
        angles="results/drift/angles.parquet",
        verdict="results/drift/verdict.parquet",
        cross_anchor="results/drift/cross_anchor.parquet",
        layer_figure="results/drift/figures/carrier_layer_vs_step.png",
        angle_figure="results/drift/figures/principal_angles.png",
    log:
        "results/logs/drift.log",
    benchmark:
        "results/benchmarks/drift.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        json=stage_params.drift_params(config),
    shell:
        "rgeom drift --directions {input.directions} --carriers {input.carriers}"
        " --activations {input.activations} --cross-anchor {input.cross_anchor}"
        " --out-dir results/drift"
        " --params {params.json:q} > {log} 2>&1"
