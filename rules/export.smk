# Export: the final stage for other tooling. One code stream: gpt.pth in the official layout,
# bpe.model, config.yaml (gpt section with our sizes) and model.json; several codebooks: our
# checkpoint folder, with the reason the official layout is refused. Either way the export is
# re-imported and checked identical, and export_report.json says what IndexTTS2 can do with it.


rule export:
    input:
        unpack(get_released_config),
        meta=rules.train_stage3.output.meta,
        weights=rules.train_stage3.output.weights,
    output:
        folder=directory(f"{RESULTS}/export"),
    log:
        f"{LOGS}/export/export.log",
    conda:
        "../envs/indextts.yaml"
    resources:
        # the released size holds the model twice (exported and re-imported)
        mem_mb=32000 if config["model"]["preset"] == "indextts2" else 4000,
    params:
        cfg=export_config(),
        code=code_id("pretrained", "checkpoint", "model/", *CORE),
        checkpoint=folder_of("meta"),
    shell:
        "indextts export --checkpoint {params.checkpoint:q} --out-dir {output.folder:q}"
        " --config {params.cfg:q} > {log:q} 2>&1"


_EXTRA_TARGETS.append(f"{RESULTS}/export")
