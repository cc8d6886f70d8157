# Synthesis: one fixed sample set (sample_list) spoken by each training stage (synthesize_samples),
# each from nothing but its checkpoint folder and the codec weights. Semantic-code stages speak
# through the released s2mel, CAM++ and BigVGAN (pretrained.s2mel, campplus, bigvgan) and also
# voice each sample's real recording from its own codes (topline/, the evaluation's topline).

SYNTH_CODE = code_id(
    "synthesize",
    "checkpoint",
    *(["audio/", "voice"] if SEMANTIC_CODES else ["audio/dac"]),
    "codes",
    "features",
    "text",
    "model/",
    *CORE,
)


rule sample_list:
    input:
        clean=f"{RESULTS}/clean/clean.parquet",
    output:
        requests=f"{RESULTS}/samples/list.tsv",
    log:
        f"{LOGS}/samples/sample_list.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("samples"),
        code=code_id("synthesize", *CORE),
    shell:
        "indextts sample-list --config {params.cfg:q} --clean {input.clean:q}"
        " --out {output.requests:q} > {log:q} 2>&1"


rule synthesize_samples:
    input:
        unpack(get_voice_files),
        meta=f"{RESULTS}/train/stage{{stage}}/model.json",
        weights=f"{RESULTS}/train/stage{{stage}}/model.safetensors",
        requests=rules.sample_list.output.requests,
        codec=config["codec"]["weights"],
    output:
        table=f"{RESULTS}/samples/stage{{stage}}/samples.tsv",
        wavs=expand(f"{RESULTS}/samples/stage{{{{stage}}}}/{{name}}.wav", name=sample_names()),
        topline=expand(
            f"{RESULTS}/samples/stage{{{{stage}}}}/topline/{{name}}.wav",
            name=sample_names() if SEMANTIC_CODES else [],
        ),
    log:
        f"{LOGS}/samples/stage{{stage}}.log",
    wildcard_constraints:
        stage="[123]",
    conda:
        "../envs/indextts.yaml"
    threads: 2
    resources:
        gpu=synthesize_gpus(),
        mem_mb=32000 if config["model"]["preset"] == "indextts2" else 4000,
    params:
        cfg=stage_config("synthesize"),
        code=SYNTH_CODE,
        runtime=runtime_params,
        checkpoint=folder_of("meta"),
        out_dir=folder_of("table"),
        voice=voice_args,
    shell:
        "indextts synthesize --checkpoint {params.checkpoint:q} --codec-weights {input.codec:q}"
        " --list {input.requests:q} --out-dir {params.out_dir:q} --table {output.table:q}{params.voice}"
        " --config {params.cfg:q} --runtime {params.runtime:q} > {log:q} 2>&1"


_EXTRA_TARGETS.extend(expand(f"{RESULTS}/samples/stage{{stage}}/samples.tsv", stage=SAMPLE_STAGES))
