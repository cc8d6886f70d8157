# Training: three stages, each one GPU job that resumes by itself from the state it saved under
# {RESULTS}/train/stageN/state/ (not a rule output, so a failed or killed job keeps it).
# A stage's params hold the shared train settings and its own subsection only, plus the code
# identity of what training runs; worker counts, log interval and progress stay out (RUNTIME).

TRAIN_CODE = code_id(
    "train", "data", "checkpoint", "features", "model/", "codes", "pretrained", *CORE
)


rule train_stage1:
    input:
        unpack(get_pretrained),
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        gate=f"{RESULTS}/validate/report.json",
    output:
        **stage_outputs(1),
    log:
        f"{LOGS}/train/stage1.log",
    conda:
        "../envs/indextts.yaml"
    threads: 4
    resources:
        gpu=train_gpus(),
        mem_mb=train_mem_mb(),
    params:
        cfg=train_config(1, "model", "text", "codec", "pretrained"),
        launch=train_launcher,
        code=TRAIN_CODE,
        runtime=runtime_params,
        out_dir=folder_of("meta"),
    shell:
        "{params.launch} train --stage 1 --config {params.cfg:q} --runtime {params.runtime:q}"
        " --codes-index {input.codes:q} --clean {input.clean:q} --bpe {input.bpe:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule train_stage2:
    input:
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        speakers=f"{RESULTS}/speakers/speakers.json",
        parent=rules.train_stage1.output.meta,
    output:
        **stage_outputs(2),
        classifier=f"{RESULTS}/train/stage2/speaker_classifier.safetensors",
    log:
        f"{LOGS}/train/stage2.log",
    conda:
        "../envs/indextts.yaml"
    threads: 4
    resources:
        gpu=train_gpus(),
        mem_mb=train_mem_mb(),
    params:
        cfg=train_config(2, "text", "codec"),
        launch=train_launcher,
        code=TRAIN_CODE,
        runtime=runtime_params,
        parent=folder_of("parent"),
        out_dir=folder_of("meta"),
    shell:
        "{params.launch} train --stage 2 --config {params.cfg:q} --runtime {params.runtime:q}"
        " --codes-index {input.codes:q} --clean {input.clean:q} --bpe {input.bpe:q}"
        " --speakers {input.speakers:q} --parent {params.parent:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule train_stage3:
    input:
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        parent=rules.train_stage2.output.meta,
    output:
        **stage_outputs(3),
    log:
        f"{LOGS}/train/stage3.log",
    conda:
        "../envs/indextts.yaml"
    threads: 4
    resources:
        gpu=train_gpus(),
        mem_mb=train_mem_mb(),
    params:
        cfg=train_config(3, "text", "codec"),
        launch=train_launcher,
        code=TRAIN_CODE,
        runtime=runtime_params,
        parent=folder_of("parent"),
        out_dir=folder_of("meta"),
    shell:
        "{params.launch} train --stage 3 --config {params.cfg:q} --runtime {params.runtime:q}"
        " --codes-index {input.codes:q} --clean {input.clean:q} --bpe {input.bpe:q}"
        " --parent {params.parent:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


_EXTRA_TARGETS.append(rules.train_stage3.output.meta)
