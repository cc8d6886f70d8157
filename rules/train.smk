# Training: three stages, each one GPU job that resumes by itself from the state it saved under
# {RESULTS}/train/stageN/state/ (not a rule output, so a failed or killed job keeps it).
# A stage's params hold the shared train settings and its own subsection only, plus the code
# identity of what training runs; worker counts, log interval and progress stay out (RUNTIME).

TRAIN_CODE = code_id(
    "train/",
    "data",
    "dataset",
    "pack",
    "checkpoint",
    "features",
    "model/",
    "codes",
    "pretrained",
    *CORE,
)


# The codes pack's text as ids of this vocabulary (indextts.pack): a new vocabulary re-tokenises
# here and leaves the codes pack alone.
rule tokenize_text:
    input:
        pack=f"{RESULTS}/codes/pack",
        bpe=f"{RESULTS}/vocab/bpe.model",
    output:
        tokens=directory(f"{RESULTS}/tokens"),
    log:
        f"{LOGS}/train/tokenize_text.log",
    conda:
        "../envs/indextts.yaml"
    params:
        code=code_id("pack", *CORE),
    shell:
        "indextts tokenize-text --pack {input.pack:q} --bpe {input.bpe:q}"
        " --output {output.tokens:q} > {log} 2>&1"


rule train_stage1:
    input:
        unpack(get_pretrained),
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        pack=rules.tokenize_text.input.pack,
        tokens=rules.tokenize_text.output.tokens,
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
        " --pack {input.pack:q} --tokens {input.tokens:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule train_stage2:
    input:
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        pack=rules.tokenize_text.input.pack,
        tokens=rules.tokenize_text.output.tokens,
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
        " --pack {input.pack:q} --tokens {input.tokens:q}"
        " --speakers {input.speakers:q} --parent {params.parent:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule train_stage3:
    input:
        codes=f"{RESULTS}/codes/index.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        pack=rules.tokenize_text.input.pack,
        tokens=rules.tokenize_text.output.tokens,
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
        " --pack {input.pack:q} --tokens {input.tokens:q}"
        " --parent {params.parent:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


_EXTRA_TARGETS.append(rules.train_stage3.output.meta)
