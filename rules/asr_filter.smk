# The ASR consistency filter (asr_filter.enabled): between cleaning and extraction, every clean
# clip is transcribed (asr_transcribe, one GPU job per shard, sharded as extract_codes) and its
# speech edges measured; asr_filter_merge scores the transcripts against their text and writes the
# clean table every later stage reads (CLEAN), its rejects and a summary. The transcripts read only
# the audio, the ASR folder and its decoding keys; the thresholds only the merge, so changing one
# re-filters without transcribing again. A shard that reruns (the corpus was cleaned again) takes
# the clips it has transcribed before from results/asr_filter/cache/, keyed by audio file and ASR
# model. Off, none of this exists and cleaning writes CLEAN.

ASR_TRANSCRIPTS = f"{RESULTS}/asr_filter/transcripts"


if ASR_FILTER:

    rule asr_transcribe:
        input:
            clean=PRE_ASR,
            model=get_asr_filter_model,
        output:
            transcripts=f"{ASR_TRANSCRIPTS}/shard-{{shard}}-of-{n_shards():05d}.parquet",
        log:
            f"{LOGS}/asr_filter/shard-{{shard}}.log",
        wildcard_constraints:
            shard=r"\d{5}",
        conda:
            "../envs/indextts.yaml"
        # On a CPU the ASR uses every thread it gets; on a GPU they read and resample the audio.
        threads: 4
        resources:
            # A GPU unless the config pins the filter's ASR to the CPU.
            gpu=asr_filter_gpus(),
            # Whisper large-v3 is 6 GB in fp32, beside a shard's audio.
            mem_mb=16000,
        params:
            cfg=asr_filter_config("transcribe"),
            code=code_id("asr_filter", "evaluation/asr", "hashing", *CORE),
            n_shards=n_shards(),
            batch_size=asr_filter_batch_size,
            cache=asr_filter_cache,
        shell:
            "indextts asr-transcribe --config {params.cfg:q} --manifest {input.clean:q}"
            " --shard {wildcards.shard} --n-shards {params.n_shards} --output {output.transcripts:q}"
            " --batch-size {params.batch_size} --threads {threads} --cache {params.cache:q} > {log} 2>&1"

    rule asr_filter_merge:
        input:
            clean=PRE_ASR,
            transcripts=expand(
                f"{ASR_TRANSCRIPTS}/shard-{{shard:05d}}-of-{n_shards():05d}.parquet",
                shard=range(n_shards()),
            ),
        output:
            clean=CLEAN,
            rejects=f"{RESULTS}/clean/asr_rejects.parquet",
            summary=f"{RESULTS}/clean/asr_summary.json",
        log:
            f"{LOGS}/asr_filter/merge.log",
        conda:
            "../envs/indextts.yaml"
        resources:
            mem_mb=8000,
        params:
            cfg=asr_filter_config("merge"),
            code=code_id("asr_filter", "evaluation/asr", "text", "manifest", *CORE),
        shell:
            "indextts asr-filter --config {params.cfg:q} --manifest {input.clean:q}"
            " --transcripts {input.transcripts:q} --clean {output.clean:q}"
            " --rejects {output.rejects:q} --summary {output.summary:q} > {log} 2>&1"

    _EXTRA_TARGETS.append(f"{RESULTS}/clean/asr_summary.json")
