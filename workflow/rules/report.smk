rule summary:
    input:
        metrics=[
            m
            for b in config["benchmarks"]
            for m in cell_paths(f"results/{{arm}}/step-{{step}}/metrics/{b}.parquet")
        ],
        directions=cell_paths("results/{arm}/step-{step}/directions.parquet"),
        train_logs=expand("results/{arm}/train_log.parquet", arm=config["arms"]),
    output:
        table="results/summary/summary.parquet",
        csv="results/summary/summary.csv",
        markdown="results/summary/summary.md",
        metrics_figure="results/summary/figures/metrics_vs_step.png",
        norm_figure="results/summary/figures/direction_norm_heatmap.png",
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
        " --train-logs {input.train_logs} --out-dir results/summary"
        " --params {params.json:q} > {log} 2>&1"
