# Data preparation: clean_manifest -> train_vocab, select_speakers. With asr_filter.enabled,
# clean_manifest writes PRE_ASR and the ASR filter (rules/asr_filter.smk) writes CLEAN.


rule clean_manifest:
    input:
        manifests=get_manifests,
    output:
        clean=PRE_ASR if ASR_FILTER else CLEAN,
        rejects=f"{RESULTS}/clean/rejects.parquet",
        summary=f"{RESULTS}/clean/summary.json",
    log:
        f"{LOGS}/clean/clean_manifest.log",
    conda:
        "../envs/indextts.yaml"
    threads: config["clean"]["probe_workers"]
    resources:
        mem_mb=8000,
    params:
        cfg=stage_config("data", "text", "clean"),
        code=code_id("manifest", "text", *CORE),
        out_dir=lambda wildcards, output: os.path.dirname(output.clean),
    shell:
        "indextts clean-manifest --config {params.cfg:q} --out-dir {params.out_dir}"
        + (" --clean {output.clean:q}" if ASR_FILTER else "")
        + " > {log} 2>&1"


rule train_vocab:
    input:
        clean=CLEAN,
    output:
        model=f"{RESULTS}/vocab/bpe.model",
        vocab=f"{RESULTS}/vocab/bpe.vocab",
        report=f"{RESULTS}/vocab/vocab_report.json",
    log:
        f"{LOGS}/vocab/train_vocab.log",
    conda:
        "../envs/indextts.yaml"
    threads: config["vocab"]["num_threads"]
    resources:
        mem_mb=8000,
    params:
        cfg=stage_config("vocab"),
        code=code_id("vocab", *CORE),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    shell:
        "indextts train-vocab --config {params.cfg:q} --clean {input.clean} --out-dir {params.out_dir} > {log} 2>&1"


rule select_speakers:
    input:
        clean=CLEAN,
    output:
        speakers=f"{RESULTS}/speakers/speakers.json",
    log:
        f"{LOGS}/speakers/select_speakers.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("speakers"),
        code=code_id("speakers", *CORE),
        # base-language speakers are classes only when stage 2 trains on their rows
        replay="--replay" if STAGE2_REPLAY else "",
    shell:
        "indextts select-speakers --config {params.cfg:q} --clean {input.clean} {params.replay}"
        " --out {output.speakers} > {log} 2>&1"
