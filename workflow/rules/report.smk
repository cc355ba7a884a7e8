rule record_config:
    output:
        "results/config.json",
    log:
        "results/logs/record_config.log",
    benchmark:
        "results/benchmarks/record_config.tsv"
    localrule: True
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # Any edit of the validated config rewrites the record, so `rgeom compare` can name
        # the keys two runs disagree on; a hash keeps a dry run's "params changed" short.
        digest=config_digest(),
    run:
        # In Snakemake's own process (no conda env): the record is the config it validated.
        from rgeom.stages.record_config import run as record_config

        record_config(output[0], config)


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
        carriers=cell_paths("results/{arm}/step-{step}/carriers.parquet"),
        drift="results/drift/drift.parquet",
        angles="results/drift/angles.parquet",
        verdict="results/drift/verdict.parquet",
        interventions="results/interventions/interventions.parquet",
        validation=validation_outputs()[:1],
        # Not read by the stage: it makes every finished summary sit beside its config.
        run_config="results/config.json",
    output:
        # Snakemake deletes a job's outputs before it runs and again when it fails, so the
        # stage writes here and publish_summary swaps the files into results/summary/: a
        # failed summary leaves the earlier good one in place.
        staging=directory(SUMMARY_STAGING),
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
        json=stage_params.summary_params(config),
        validation=lambda w, input: (
            f"--validation {input.validation}" if input.validation else ""
        ),
    shell:
        "rgeom summary --metrics {input.metrics} --directions {input.directions}"
        " --train-logs {input.train_logs} --utility-shift {input.utility_shift}"
        " --carriers {input.carriers} --drift-dir results/drift"
        " --interventions {input.interventions} --out-dir {output.staging}"
        " {params.validation} --params {params.json:q} > {log} 2>&1"


rule publish_summary:
    input:
        staging=SUMMARY_STAGING,
    output:
        table="results/summary/summary.parquet",
        csv=report(
            "results/summary/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
            labels={"table": "all metrics per arm and step (CSV)"},
        ),
        markdown="results/summary/summary.md",
        behaviour=report_table("behaviour", "behaviour per arm and anchor"),
        geometry=report_table("geometry", "geometry per arm and anchor"),
        interventions=report_table("interventions", "interventions per arm and anchor"),
        verdict=report_table("verdict", "verdict per arm"),
        judges=report_table("judges", "judge validity beside its numbers"),
        table_files=report_table_files(),
        asr=report_figure("asr_vs_step", "Behaviour", "1 ASR vs step"),
        xstest=report_figure("xstest_vs_step", "Behaviour", "2 XSTest refusal vs step"),
        frontier=report_figure(
            "robustness_utility", "Behaviour", "3 robustness vs utility"
        ),
        metrics=report_figure("metrics_vs_step", "Behaviour", "4 all metrics vs step"),
        carrier_layer=report_figure(
            "carrier_layer_vs_step", "Geometry", "1 carrier layer vs step"
        ),
        carrier_heatmaps=report_figure(
            "carrier_heatmaps", "Geometry", "2 bypass, induce, KL per layer"
        ),
        erank=report_figure("erank_vs_step", "Geometry", "3 effective rank vs step"),
        angles=report_figure("principal_angles", "Geometry", "4 principal angles"),
        norms=report_figure(
            "direction_norm_heatmap", "Geometry", "5 direction norm per layer"
        ),
        intervention_frontiers=[
            report_figure(f"frontier_{arm}", "Interventions", f"refusal vs KL, {arm}")
            for arm in config["arms"]
        ],
        loss=report_figure("train_loss", "Training", "training losses"),
        svgs=expand(
            "results/summary/figures/{name}.svg",
            name=REPORT_FIGURES + [f"frontier_{arm}" for arm in config["arms"]],
        ),
    log:
        "results/logs/publish_summary.log",
    localrule: True
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # What the report shows beside each figure and table: plain words, not JSON.
        **summary_labels(),
    run:
        from rgeom.report import publish_summary

        publish_summary(input.staging, "results/summary", output)
