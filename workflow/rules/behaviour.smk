rule generate:
    input:
        model=model_dir,
        # The attack benchmark replays results/attacks/test_cases.parquet (attacks.smk).
        prompts=generate_prompts,
    output:
        table="results/{arm}/step-{step}/generations/{benchmark}.parquet",
    log:
        "results/logs/generate/{arm}-{step}-{benchmark}.log",
    benchmark:
        "results/benchmarks/generate/{arm}-{step}-{benchmark}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        json=untracked(lambda w: generate_params(w)),
        key=lambda w: generate_params(w, perf=False),
    shell:
        "rgeom generate --model {input.model} --prompts {input.prompts}"
        " --out {output.table} --params {params.json:q} > {log} 2>&1"


rule judge:
    input:
        # generations always; the prompt set and local judge models with a model judge.
        unpack(judge_inputs),
    output:
        labels="results/{arm}/step-{step}/judgements/{benchmark}.parquet",
    log:
        "results/logs/judge/{arm}-{step}-{benchmark}.log",
    benchmark:
        "results/benchmarks/judge/{arm}-{step}-{benchmark}.tsv"
    conda:
        # Model judges need torch, transformers and peft.
        "../envs/train.yaml" if model_judges() else "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=40000 if model_judges() else 1000,
        runtime=120 if model_judges() else 10,
        gpu=judge_gpu(),
    params:
        # judge.batch_size only sizes the judge models' batches: untracked, as generate's.
        json=untracked(lambda w: stage_params.judge_json(config)),
        key=stage_params.judge_json(config, perf=False),
        prompts=lambda w, input: (
            f"--prompts {input.prompts}" if "prompts" in input.keys() else ""
        ),
    shell:
        "rgeom judge --generations {input.generations} --labels {output.labels}"
        " {params.prompts} --params {params.json:q} > {log} 2>&1"


# The cheap half of judging: metrics and their bootstrap CIs from every benchmark's labels
# of one cell, in seconds, so judge.bootstrap reruns this and never a judge model. A local
# rule: under SLURM a job of seconds would mostly wait in the queue.
rule metrics:
    input:
        labels=cell_files(
            "judgements/{benchmark}.parquet", benchmark=config["benchmarks"]
        ),
    output:
        metrics=cell_files(
            "metrics/{benchmark}.parquet", benchmark=config["benchmarks"]
        ),
    log:
        "results/logs/metrics/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/metrics/{arm}-{step}.tsv"
    localrule: True
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        json=stage_params.metrics_json(config),
    shell:
        "rgeom metrics --labels {input.labels} --out {output.metrics}"
        " --params {params.json:q} > {log} 2>&1"
