# Issue #4: attack test cases. Fixed-source methods (DirectRequest, Templates, GCG-transfer,
# AutoDAN) are built once against the source model
# (results/attacks/{method}.parquet), merged into results/attacks/test_cases.parquet and
# replayed unchanged by the attack benchmark's generate job at every anchor of both arms;
# adaptive GCG and adaptive AutoDAN (attacks.adaptive.methods) are re-optimised against each
# checkpoint (results/{arm}/step-{step}/adaptive_{gcg,autodan}_cases.parquet, then
# _completions, the judged adaptive_{gcg,autodan}.parquet and _metrics.parquet).

# Helpers (ATTACKS, generate_prompts, attack_inputs, ...) live in common.smk.


rule attack:
    input:
        unpack(attack_inputs),
    output:
        table="results/attacks/{method}.parquet",
    log:
        "results/logs/attack/{method}.log",
    benchmark:
        "results/benchmarks/attack/{method}.tsv"
    wildcard_constraints:
        method="DirectRequest|Templates",
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=attack_params,
        flags=lambda w, input: optional_flags(input, "templates"),
    shell:
        "rgeom attack --method {wildcards.method} --behaviors {input.behaviors}"
        " --out {output.table} {params.flags} --params {params.json:q} > {log} 2>&1"


rule attack_gcg:
    # One chunk of GCG-transfer's behaviours (attacks.gcg.jobs chunks, round-robin): each
    # is its own SLURM job of a few hours instead of one job of 27-50 h at paper scale.
    input:
        unpack(attack_gcg_inputs),
    output:
        table="results/attacks/GCG-transfer/chunk-{chunk}.parquet",
    log:
        "results/logs/attack/GCG-transfer-{chunk}.log",
    benchmark:
        "results/benchmarks/attack/GCG-transfer-{chunk}.tsv"
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=GPU,
    params:
        json=lambda w: gcg_params(chunk=int(w.chunk)),
        model=attack_source()[0],
        flags=lambda w, input: optional_flags(input, "targets"),
    shell:
        "rgeom attack --method GCG-transfer --behaviors {input.behaviors}"
        " --model {params.model} --out {output.table} {params.flags}"
        " --params {params.json:q} > {log} 2>&1"


rule attack_gcg_merge:
    input:
        parts=gcg_chunks(),
        behaviors=attack_behaviours(),
    output:
        table="results/attacks/GCG-transfer.parquet",
    log:
        "results/logs/attack/GCG-transfer.log",
    benchmark:
        "results/benchmarks/attack/GCG-transfer.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=gcg_params(),
    shell:
        "rgeom attack-merge --method GCG-transfer --parts {input.parts}"
        " --behaviors {input.behaviors} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


rule attack_autodan:
    input:
        unpack(attack_autodan_inputs),
    output:
        table="results/attacks/AutoDAN.parquet",
    log:
        "results/logs/attack/AutoDAN.log",
    benchmark:
        "results/benchmarks/attack/AutoDAN.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=GPU,
    params:
        json=stage_params.attack_autodan_params(config),
        key=lambda w: targets_key(),
        model=attack_source()[0],
        flags=lambda w, input: optional_flags(input, "targets", "templates"),
    shell:
        "rgeom attack --method AutoDAN --behaviors {input.behaviors}"
        " --model {params.model} --out {output.table} {params.flags}"
        " --params {params.json:q} > {log} 2>&1"


rule test_cases:
    input:
        cases=expand("results/attacks/{method}.parquet", method=ATTACKS["methods"]),
        extra=ATTACKS["extra_test_cases"],
        behaviors=attack_behaviours(),
    output:
        table="results/attacks/test_cases.parquet",
    log:
        "results/logs/attack/test_cases.log",
    benchmark:
        "results/benchmarks/attack/test_cases.tsv"
    conda:
        "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        json=params_json(),
    shell:
        "rgeom test-cases --cases {input.cases} {input.extra}"
        " --behaviors {input.behaviors} --out {output.table}"
        " --params {params.json:q} > {log} 2>&1"


# Adaptive attacks are four jobs per (cell, attack), so that each setting reruns only what
# it changes: the search (attacks.adaptive / attacks.autodan; hours per behaviour at paper
# scale), adaptive_generate (generate.max_new_tokens), adaptive_judge (judge.*) and
# adaptive_metrics (judge.bootstrap).
rule adaptive_gcg:
    input:
        unpack(adaptive_inputs),
    output:
        table="results/{arm}/step-{step}/adaptive_gcg_cases.parquet",
    log:
        "results/logs/adaptive_gcg/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/adaptive_gcg/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=GPU,
    params:
        json=lambda w: adaptive_params(w),
        flags=lambda w, input: optional_flags(input, "targets"),
    shell:
        "rgeom adaptive-gcg --model {input.model} --behaviors {input.behaviors}"
        " --out {output.table} {params.flags} --params {params.json:q} > {log} 2>&1"


# Adaptive AutoDAN: attacks.autodan's genetic search re-run against each checkpoint on
# the adaptive subset (attacks.adaptive.n_behaviors), then generated and judged as above.
rule adaptive_autodan:
    input:
        unpack(adaptive_autodan_inputs),
    output:
        table="results/{arm}/step-{step}/adaptive_autodan_cases.parquet",
    log:
        "results/logs/adaptive_autodan/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/adaptive_autodan/{arm}-{step}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=GPU,
    params:
        json=lambda w: adaptive_autodan_params(w),
        flags=lambda w, input: optional_flags(input, "targets", "templates"),
    shell:
        "rgeom adaptive-autodan --model {input.model} --behaviors {input.behaviors}"
        " --out {output.table} {params.flags} --params {params.json:q} > {log} 2>&1"


rule adaptive_generate:
    input:
        model=model_dir,
        cases="results/{arm}/step-{step}/adaptive_{attack}_cases.parquet",
    output:
        table="results/{arm}/step-{step}/adaptive_{attack}_completions.parquet",
    log:
        "results/logs/adaptive_generate/{arm}-{step}-{attack}.log",
    benchmark:
        "results/benchmarks/adaptive_generate/{arm}-{step}-{attack}.tsv"
    wildcard_constraints:
        attack="gcg|autodan",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    params:
        json=untracked(lambda w: adaptive_generate_params(w)),
        key=lambda w: adaptive_generate_params(w, perf=False),
    shell:
        "rgeom adaptive-generate --model {input.model} --cases {input.cases}"
        " --out {output.table} --params {params.json:q} > {log} 2>&1"


# The configured judge (judge.harmbench etc.), not the embedded matcher alone, decides
# success, exactly as in the judge rule.
rule adaptive_judge:
    input:
        unpack(adaptive_judge_inputs),
    output:
        table="results/{arm}/step-{step}/adaptive_{attack}.parquet",
    log:
        "results/logs/adaptive_judge/{arm}-{step}-{attack}.log",
    benchmark:
        "results/benchmarks/adaptive_judge/{arm}-{step}-{attack}.tsv"
    wildcard_constraints:
        attack="gcg|autodan",
    conda:
        # Model judges need torch, transformers and peft (as rule judge).
        "../envs/train.yaml" if model_judges() else "../envs/analysis.yaml"
    threads: 1
    resources:
        mem_mb=40000 if model_judges() else 1000,
        runtime=60 if model_judges() else 10,
        gpu=judge_gpu(),
    params:
        # judge.batch_size only sizes the judge models' batches: untracked, as generate's.
        json=untracked(lambda w: stage_params.judge_json(config)),
        key=stage_params.judge_json(config, perf=False),
        prompts=lambda w, input: (
            f"--prompts {input.prompts}" if "prompts" in input.keys() else ""
        ),
    shell:
        "rgeom adaptive-judge --completions {input.completions} --out {output.table}"
        " {params.prompts} --params {params.json:q} > {log} 2>&1"


# Each adaptive attack's ASR and its bootstrap CI, from the judged rows of one cell: seconds,
# a local rule like metrics (behaviour.smk).
rule adaptive_metrics:
    input:
        labels=cell_files(
            "adaptive_{attack}.parquet", attack=ATTACKS["adaptive"]["methods"]
        ),
    output:
        metrics=cell_files(
            "adaptive_{attack}_metrics.parquet", attack=ATTACKS["adaptive"]["methods"]
        ),
    log:
        "results/logs/adaptive_metrics/{arm}-{step}.log",
    benchmark:
        "results/benchmarks/adaptive_metrics/{arm}-{step}.tsv"
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
        "rgeom adaptive-metrics --labels {input.labels} --out {output.metrics}"
        " --params {params.json:q} > {log} 2>&1"
