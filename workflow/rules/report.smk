rule record_config:
    output:
        "results/config.json",
    log:
        "results/logs/record_config.log",
    benchmark:
        "results/benchmarks/record_config.tsv"
    localrule: True
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # The whole validated config: any edit rewrites the record, so `rgeom compare` can
        # name the keys two runs disagree on.
        json=params_json(**config),
    shell:
        "rgeom record-config --out {output} --params {params.json:q} > {log} 2>&1"


rule summary:
    input:
        metrics=[
            m
            for b in config["benchmarks"]
            for m in cell_paths(f"results/{{arm}}/step-{{step}}/metrics/{b}.parquet")
        ]
        + adaptive_metrics(),
        directions=cell_paths("results/{arm}/step-{step}/directions.parquet"),
        train_logs=expand("results/{arm}/train_log.parquet", arm=config["arms"]),
        utility_shift=utility_shift_outputs(),
        # Not read by the stage: it makes every finished summary sit beside its config.
        run_config="results/config.json",
    output:
        table="results/summary/summary.parquet",
        csv=report(
            "results/summary/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary per arm and step"},
        ),
        markdown="results/summary/summary.md",
        metrics_figure=report(
            "results/summary/figures/metrics_vs_step.png",
            caption="../report/metrics_vs_step.rst",
            category="Figures",
            labels={"figure": "behaviour metrics vs step"},
        ),
        norm_figure=report(
            "results/summary/figures/direction_norm_heatmap.png",
            caption="../report/direction_norm_heatmap.rst",
            category="Figures",
            labels={"figure": "refusal direction norm"},
        ),
        loss_figure=report(
            "results/summary/figures/train_loss.png",
            caption="../report/train_loss.rst",
            category="Figures",
            labels={"figure": "training loss"},
        ),
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=params_json(
            arms=config["arms"],
            anchors=config["anchors"],
            benchmarks=config["benchmarks"],
            summary=config["summary"],
        ),
    shell:
        "rgeom summary --metrics {input.metrics} --directions {input.directions}"
        " --train-logs {input.train_logs} --utility-shift {input.utility_shift}"
        " --out-dir results/summary"
        " --params {params.json:q} > {log} 2>&1"
