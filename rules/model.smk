# Model: validate_pipeline gates training. Issue 4.


rule validate_pipeline:
    input:
        unpack(get_pretrained),
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        codes=f"{RESULTS}/codes/index.json",
        pack=f"{RESULTS}/codes/pack",
        tokens=f"{RESULTS}/tokens",
    output:
        report=f"{RESULTS}/validate/report.json",
    log:
        f"{LOGS}/validate/validate.log",
    conda:
        "../envs/indextts.yaml"
    threads: 2
    resources:
        gpu=0 if config["validate"]["device"] == "cpu" else 1,
        # the released size holds two 3.5 GB models and their gradients during the round trip
        mem_mb=32000 if config["model"]["preset"] == "indextts2" else 4000,
    params:
        cfg=stage_config("text", "vocab", "codec", "codes", "model", "pretrained", "validate"),
        code=code_id(
            "validate",
            "pretrained",
            "data",
            "dataset",
            "pack",
            "checkpoint",
            "features",
            "model/",
            "codes",
            *CORE,
        ),
    shell:
        "indextts validate --config {params.cfg:q} --clean {input.clean:q} --bpe {input.bpe:q}"
        " --codes-index {input.codes:q} --pack {input.pack:q} --tokens {input.tokens:q}"
        " --out {output.report:q} > {log:q} 2>&1"


_EXTRA_TARGETS.append(f"{RESULTS}/validate/report.json")
