# Codec codes: the demo codec, extract_codes (one job per shard) and index_codes (gather).
# Extraction reads only the codec and codes config sections (and features, when it stores them)
# and the codec/codes modules, never the vocabulary: a vocab change does not re-encode audio, a
# codec change does. codec.kind semantic runs w2v-BERT 2.0 + the MaskGCT codec instead of DAC.

CODES = f"{RESULTS}/codes"
SHARD_FILES = [f"{shard_name(i)}.parquet" for i in range(n_shards())]
SEMANTIC = config["codec"]["kind"] == "semantic"
# features.store: extract_codes also writes codes/features/<shard> (the semantic codec's inputs).
STORE_FEATURES = bool(config["features"]["store"])
FEATURE_OUTPUT = f"{CODES}/features/shard-{{shard}}-of-{n_shards():05d}.parquet"
FEATURE_FILES = expand(f"{CODES}/features/{{name}}", name=SHARD_FILES) if STORE_FEATURES else []


if config["demo"]["enabled"]:
    # demo.codec: packaged installs the committed trained DAC, train trains it here on the
    # corpus's train split (it then waits for clean_manifest), random writes an untrained one.
    DEMO_CODEC_MODE = config["demo"]["codec"]
    DEMO_CODEC_SHELL = {
        "packaged": "indextts demo-codec --packaged --output {output.weights:q} > {log} 2>&1",
        "train": "indextts demo-codec --manifest {input.clean:q} --output {output.weights:q}"
        " --steps {params.steps} --lr-schedule cosine --seed {params.seed} --threads {threads}"
        " --no-progress > {log} 2>&1",
        "random": "indextts make-demo-codec --output {output.weights:q} > {log} 2>&1",
    }[DEMO_CODEC_MODE]

    rule make_demo_codec:
        input:
            # train: the corpus; packaged: the committed file, so a new one is installed
            **{
                "train": {"clean": f"{RESULTS}/clean/clean.parquet"},
                "packaged": {"packaged": "indextts/data/demo_codec/dac_demo_16khz.pth"},
            }.get(DEMO_CODEC_MODE, {}),
        output:
            weights=DEMO_CODEC,
        log:
            f"{LOGS}/codes/make_demo_codec.log",
        conda:
            "../envs/indextts.yaml"
        # One torch thread: the trained file's bytes are reproducible for a thread count.
        threads: 1
        params:
            mode=DEMO_CODEC_MODE,
            steps=config["demo"]["codec_steps"] if DEMO_CODEC_MODE == "train" else None,
            seed=config["demo"]["seed"] if DEMO_CODEC_MODE == "train" else None,
            code=code_id("audio/dac", "demo_codec", *CORE),
        shell:
            DEMO_CODEC_SHELL


rule extract_codes:
    input:
        unpack(get_codec_files),
        clean=f"{RESULTS}/clean/clean.parquet",
    output:
        **({"features": FEATURE_OUTPUT} if STORE_FEATURES else {}),
        shard=f"{CODES}/shard-{{shard}}-of-{n_shards():05d}.parquet",
        rejects=f"{CODES}/rejects/shard-{{shard}}-of-{n_shards():05d}.parquet",
    log:
        f"{LOGS}/codes/shard-{{shard}}.log",
    wildcard_constraints:
        shard=r"\d{5}",
    conda:
        "../envs/indextts.yaml"
    # The CPU encoder uses every thread it gets; on a GPU they feed the DataLoader workers.
    threads: 4
    resources:
        # A GPU unless the config pins the codec to the CPU (then none is held for nothing).
        gpu=0 if config["codec"]["device"] == "cpu" else 1,
        # w2v-BERT 2.0 is 2.3 GB in fp32, beside its activations.
        mem_mb=16000 if SEMANTIC else 8000,
    params:
        # frame_tolerance is index_codes' check: changing it must not re-encode the shards.
        cfg=stage_config(
            "codec",
            "codes",
            *(["features"] if STORE_FEATURES else []),
            unread=("codes.frame_tolerance",),
        ),
        code=code_id(
            "audio/dac",
            "codes",
            "hashing",
            *(["features", "audio/w2v_bert", "audio/semantic_codec"] if SEMANTIC else []),
            *CORE,
        ),
        features=features_arg,
        runtime=runtime_params,
    shell:
        "indextts extract-codes --config {params.cfg:q} --runtime {params.runtime:q}"
        " --manifest {input.clean:q} --shard {wildcards.shard}"
        " --output {output.shard:q} --rejects {output.rejects:q}{params.features} --threads {threads}"
        " > {log} 2>&1"


rule index_codes:
    input:
        clean=f"{RESULTS}/clean/clean.parquet",
        shards=expand(f"{CODES}/{{name}}", name=SHARD_FILES),
        rejects=expand(f"{CODES}/rejects/{{name}}", name=SHARD_FILES),
        features=FEATURE_FILES,
    output:
        index=f"{CODES}/index.json",
    log:
        f"{LOGS}/codes/index_codes.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("codes"),
        code=code_id("codes", *(["features"] if STORE_FEATURES else []), *CORE),
        features=features_arg,
        runtime=runtime_params,
    shell:
        "indextts index-codes --config {params.cfg:q} --runtime {params.runtime:q}"
        " --manifest {input.clean:q} --shards {input.shards:q}"
        " --rejects {input.rejects:q}{params.features} --output {output.index:q} > {log} 2>&1"


# The training data cache (indextts.pack): the shards' codes, lengths, speakers and splits as
# numpy files every training process reads through the shared page cache. It reads the shards and
# the manifest's splits, not index.json, so index_codes' own check (frame_tolerance) repacks nothing.
rule pack_codes:
    input:
        clean=f"{RESULTS}/clean/clean.parquet",
        shards=expand(f"{CODES}/{{name}}", name=SHARD_FILES),
    output:
        pack=directory(f"{CODES}/pack"),
    log:
        f"{LOGS}/codes/pack_codes.log",
    conda:
        "../envs/indextts.yaml"
    resources:
        # one shard in memory at a time
        mem_mb=8000,
    params:
        code=code_id("pack", "codes", *CORE),
    shell:
        "indextts pack-codes --shards {input.shards:q} --clean {input.clean:q}"
        " --output {output.pack:q} > {log} 2>&1"


_EXTRA_TARGETS.append(f"{CODES}/index.json")
