# Demo corpus (espeak-ng Amharic) for the embedded default config.
# Only defined when the config asks for it: a real corpus never needs espeak-ng.


if config["demo"]["enabled"]:

    rule demo_corpus:
        output:
            manifest=f"{RESULTS}/demo/corpus/manifest.jsonl",
            expected_rejects=f"{RESULTS}/demo/corpus/expected_rejects.json",
        params:
            cfg=stage_config("demo"),
            code=code_id("demo", *CORE),
        log:
            f"{LOGS}/demo/demo_corpus.log",
        threads: config["demo"]["workers"]
        shell:
            "indextts demo-corpus --config {params.cfg:q} --out-dir results/demo/corpus > {log} 2>&1"
