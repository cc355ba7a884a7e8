rule prepare_data:
    input:
        # The set's file is tracked by content (params.key), not path: see content_key.
        tokenizer="results/model/base",
    output:
        table="results/data/{dataset}.parquet",
    log:
        "results/logs/prepare_data/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_data/{dataset}.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=untracked(prepare_data_params),
        key=lambda w: prepare_data_params(w, tracked=True),
    shell:
        "rgeom prepare-data --name {wildcards.dataset} --out {output.table}"
        " --tokenizer {input.tokenizer} --params {params.json:q} > {log} 2>&1"


rule sft_data:
    input:
        model="results/model/base",
        harmful="results/data/train_harmful.parquet",
        harmless="results/data/train_harmless.parquet",
    output:
        table="results/data/sft_train.parquet",
    log:
        "results/logs/sft_data.log",
    benchmark:
        "results/benchmarks/sft_data.tsv"
    # First link of the training chain, the DAG's longest path (see rule train).
    priority: 50
    conda:
        "../envs/train.yaml"
    # One thread, as for train: a 2-thread job waits until both cores are free at once, and
    # the demo started this link of the longest path 160 s late behind 1-thread cell jobs.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        # generate.batch_size only sizes the batches: untracked (common.smk: untracked).
        json=untracked(lambda w: stage_params.sft_data_params(config)),
        key=stage_params.sft_data_params(config, perf=False),
    shell:
        "rgeom sft-data --model {input.model} --harmful {input.harmful}"
        " --harmless {input.harmless} --out {output.table} --params {params.json:q} > {log} 2>&1"
