# Model: validate_pipeline gates training. Issue 4.


def get_pretrained(wildcards):
    """The official gpt.pth / bpe.model named in the pretrained section (those that are set), so
    replacing either file reruns the gate."""
    pre = config.get("pretrained", {}) or {}
    return {f"pretrained_{k}": pre[k] for k in ("gpt", "bpe") if pre.get(k)}


rule validate_pipeline:
    input:
        unpack(get_pretrained),
        clean=f"{RESULTS}/clean/clean.parquet",
        bpe=f"{RESULTS}/vocab/bpe.model",
        codes=f"{RESULTS}/codes/index.json",
    output:
        report=f"{RESULTS}/validate/report.json",
    params:
        cfg=stage_config("text", "vocab", "codec", "codes", "model", "pretrained", "validate"),
        code=code_id(
            "validate", "pretrained", "data", "checkpoint", "features", "model/", "codes", *CORE
        ),
    log:
        f"{LOGS}/validate/validate.log",
    threads: 2
    resources:
        gpu=0 if config["validate"]["device"] == "cpu" else 1,
        # the released size holds two 3.5 GB models and their gradients during the round trip
        mem_mb=32000 if config["model"]["preset"] == "indextts2" else 4000,
    shell:
        "indextts validate --config {params.cfg:q} --clean {input.clean:q} --bpe {input.bpe:q}"
        " --codes-index {input.codes:q} --out {output.report:q} > {log:q} 2>&1"


_EXTRA_TARGETS.append(f"{RESULTS}/validate/report.json")
