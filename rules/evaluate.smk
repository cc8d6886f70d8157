# Evaluation: every stage's samples scored against the real recordings of their texts
# (evaluate_stage), beside what they are compared with, scored once for all stages
# (evaluate_reference: the DAC topline, the floor, the real recordings; a semantic-code stage's
# topline is its own, made by synthesize_samples and scored by evaluate_stage), and linear probes
# on each stage's frozen conditioners (probe_stage). Model-based measures (CER, speaker similarity) run when
# eval.asr.path / eval.speaker.path name local model folders.

EVAL_CODE = code_id("evaluation/", "synthesize", "text", "audio/dac", "codes", *CORE)
# The probes load a stage checkpoint and compute its prompt features.
PROBE_CODE = code_id("evaluation/", "checkpoint", "features", "model/", *CORE)


rule evaluate_reference:
    input:
        requests=rules.sample_list.output.requests,
        clean=f"{RESULTS}/clean/clean.parquet",
        codec=[] if SEMANTIC_CODES else config["codec"]["weights"],
        models=get_eval_models,
    output:
        scores=f"{RESULTS}/eval/reference/scores.parquet",
        summary=f"{RESULTS}/eval/reference/summary.json",
        features=f"{RESULTS}/eval/reference/features.npz",
        topline=expand(
            f"{RESULTS}/eval/reference/topline/{{name}}.wav",
            name=[] if SEMANTIC_CODES else sample_names(),
        ),
    log:
        f"{LOGS}/eval/reference.log",
    conda:
        "../envs/indextts.yaml"
    threads: 2
    resources:
        gpu=eval_gpus(),
    params:
        cfg=eval_config(
            unread=("eval.probe",), extra={"model": ("n_codebooks",), "codec": ("n_quantizers",)}
        ),
        code=EVAL_CODE,
        out_dir=folder_of("scores"),
        codec=lambda wildcards, input: (
            f" --codec-weights {shlex.quote(input.codec)}" if input.codec else ""
        ),
    shell:
        "indextts evaluate-reference --config {params.cfg:q} --samples {input.requests:q}"
        " --clean {input.clean:q}{params.codec} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"


rule evaluate_stage:
    input:
        table=f"{RESULTS}/samples/stage{{stage}}/samples.tsv",
        wavs=expand(f"{RESULTS}/samples/stage{{{{stage}}}}/{{name}}.wav", name=sample_names()),
        topline=rules.synthesize_samples.output.topline,
        clean=f"{RESULTS}/clean/clean.parquet",
        reference=rules.evaluate_reference.output.scores,
        features=rules.evaluate_reference.output.features,
        models=get_eval_models,
    output:
        scores=f"{RESULTS}/eval/stage{{stage}}/scores.parquet",
        summary=f"{RESULTS}/eval/stage{{stage}}/summary.json",
    log:
        f"{LOGS}/eval/stage{{stage}}.log",
    wildcard_constraints:
        stage="[123]",
    conda:
        "../envs/indextts.yaml"
    threads: 2
    resources:
        gpu=eval_gpus(),
    params:
        cfg=eval_config(unread=("eval.probe",)),
        code=EVAL_CODE,
        out_dir=folder_of("scores"),
        topline=lambda wildcards, input: (
            f" --topline-dir {shlex.quote(str(Path(input.topline[0]).parent))}"
            if input.topline
            else ""
        ),
    shell:
        "indextts evaluate --config {params.cfg:q} --samples {input.table:q} --clean {input.clean:q}"
        " --reference {input.reference:q} --features {input.features:q}{params.topline}"
        " --out-dir {params.out_dir:q} --label stage{wildcards.stage} > {log:q} 2>&1"


rule probe_stage:
    input:
        meta=f"{RESULTS}/train/stage{{stage}}/model.json",
        weights=f"{RESULTS}/train/stage{{stage}}/model.safetensors",
        clean=f"{RESULTS}/clean/clean.parquet",
    output:
        probe=f"{RESULTS}/eval/stage{{stage}}/probe.json",
    log:
        f"{LOGS}/eval/probe{{stage}}.log",
    wildcard_constraints:
        stage="[123]",
    conda:
        "../envs/indextts.yaml"
    threads: 2
    resources:
        gpu=probe_gpus(),
    params:
        cfg=eval_config(keys=("probe", "seed", "device")),
        code=PROBE_CODE,
        checkpoint=folder_of("meta"),
    shell:
        "indextts probe --config {params.cfg:q} --checkpoint {params.checkpoint:q}"
        " --clean {input.clean:q} --out {output.probe:q} > {log:q} 2>&1"


_EXTRA_TARGETS.extend(
    [
        *expand(f"{RESULTS}/eval/stage{{stage}}/summary.json", stage=EVAL_STAGES),
        *expand(f"{RESULTS}/eval/stage{{stage}}/probe.json", stage=PROBE_STAGES),
    ]
)
