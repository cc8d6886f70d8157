# Demo corpus (espeak-ng Amharic) for the embedded default config.
# Only defined when the config asks for it: a real corpus never needs espeak-ng.


if config["demo"]["enabled"]:

    rule demo_corpus:
        output:
            manifest=DEMO_MANIFEST,
            expected_rejects=f"{RESULTS}/demo/corpus/expected_rejects.json",
        log:
            f"{LOGS}/demo/demo_corpus.log",
        conda:
            "../envs/indextts.yaml"
        threads: config["demo"]["workers"]
        params:
            cfg=stage_config("demo", unread=("demo.codec", "demo.codec_steps")),
            code=code_id("demo", *CORE),
            out_dir=folder_of("manifest"),
        shell:
            "indextts demo-corpus --config {params.cfg:q} --out-dir {params.out_dir:q} > {log} 2>&1"
