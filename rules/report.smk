# Report pieces: each rule draws one part of the report from outputs that exist already, and flags
# what it writes with report(), so `snakemake --report <run.results_dir>/report.zip` gathers them
# by category (captions in rules/report/). The samples are one HTML page with <audio> elements, a
# directory output whose clips travel in the zip beside it: Snakemake's viewer does not play WAV.

REPORT_CODE = code_id("report", *CORE)
FMT = config["report"]["format"]
REPORT_DIR = f"{RESULTS}/report"


rule report_data:
    input:
        **({"asr_summary": f"{RESULTS}/clean/asr_summary.json"} if ASR_FILTER else {}),
        summary=f"{RESULTS}/clean/summary.json",
        clean=f"{RESULTS}/clean/clean.parquet",
        vocab_report=f"{RESULTS}/vocab/vocab_report.json",
        speakers=f"{RESULTS}/speakers/speakers.json",
    output:
        **(
            {
                "asr_cer": report(
                    f"{REPORT_DIR}/data/asr_cer.{FMT}",
                    caption="report/asr_cer.rst",
                    category="1. Data",
                )
            }
            if ASR_FILTER
            else {}
        ),
        page=report(f"{REPORT_DIR}/data/data.html", caption="report/data.rst", category="1. Data"),
        durations=report(
            f"{REPORT_DIR}/data/durations.{FMT}",
            caption="report/durations.rst",
            category="1. Data",
        ),
        speakers=report(
            f"{REPORT_DIR}/data/speakers.{FMT}",
            caption="report/speakers.rst",
            category="1. Data",
        ),
    log:
        f"{LOGS}/report/report_data.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("report"),
        code=REPORT_CODE,
    shell:
        "indextts report-data --config {params.cfg:q} --summary {input.summary:q}"
        " --clean {input.clean:q} --vocab-report {input.vocab_report:q}"
        " --speakers {input.speakers:q} --page {output.page:q}"
        " --durations {output.durations:q} --speakers-plot {output.speakers:q}"
        + (
            " --asr-summary {input.asr_summary:q} --asr-cer {output.asr_cer:q}"
            if ASR_FILTER
            else ""
        )
        + " > {log:q} 2>&1"


rule report_stage:
    input:
        metrics=f"{RESULTS}/train/stage{{stage}}/metrics.jsonl",
        meta=f"{RESULTS}/train/stage{{stage}}/model.json",
    output:
        losses=report(
            f"{REPORT_DIR}/stage{{stage}}/losses.{FMT}",
            caption="report/losses.rst",
            category=report_stage_category,
        ),
        throughput=report(
            f"{REPORT_DIR}/stage{{stage}}/throughput.{FMT}",
            caption="report/throughput.rst",
            category=report_stage_category,
        ),
        summary=report(
            f"{REPORT_DIR}/stage{{stage}}/summary.html",
            caption="report/stage_summary.rst",
            category=report_stage_category,
        ),
    log:
        f"{LOGS}/report/stage{{stage}}.log",
    wildcard_constraints:
        stage="[123]",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("report"),
        code=REPORT_CODE,
        transfer=transfer_arg,
    shell:
        "indextts report-stage --config {params.cfg:q} --stage {wildcards.stage}"
        " --metrics {input.metrics:q} --meta {input.meta:q}{params.transfer}"
        " --losses {output.losses:q} --throughput {output.throughput:q}"
        " --summary {output.summary:q} > {log:q} 2>&1"


rule report_speaker:
    input:
        metrics=rules.train_stage2.output.metrics,
        meta=rules.train_stage2.output.meta,
    output:
        speaker=report(
            f"{REPORT_DIR}/stage2/speaker.{FMT}",
            caption="report/speaker.rst",
            category="3. Stage 2",
        ),
    log:
        f"{LOGS}/report/speaker.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("report"),
        code=REPORT_CODE,
    shell:
        "indextts report-stage --config {params.cfg:q} --stage 2 --metrics {input.metrics:q}"
        " --meta {input.meta:q} --speaker {output.speaker:q} > {log:q} 2>&1"


rule report_eval:
    input:
        summaries=expand(f"{RESULTS}/eval/stage{{stage}}/summary.json", stage=EVAL_STAGES),
        probes=expand(f"{RESULTS}/eval/stage{{stage}}/probe.json", stage=PROBE_STAGES),
    output:
        page=report(
            f"{REPORT_DIR}/eval/evaluation.html",
            caption="report/evaluation.rst",
            category="5. Evaluation",
        ),
        plot=report(
            f"{REPORT_DIR}/eval/measures.{FMT}",
            caption="report/eval_plot.rst",
            category="5. Evaluation",
        ),
    log:
        f"{LOGS}/report/eval.log",
    conda:
        "../envs/indextts.yaml"
    params:
        cfg=stage_config("report"),
        code=REPORT_CODE,
    shell:
        "indextts report-eval --config {params.cfg:q} --summaries {input.summaries:q}"
        " --probes {input.probes:q} --page {output.page:q} --plot {output.plot:q} > {log:q} 2>&1"


rule report_samples:
    input:
        tables=expand(f"{RESULTS}/samples/stage{{stage}}/samples.tsv", stage=SAMPLE_STAGES),
        wavs=expand(
            f"{RESULTS}/samples/stage{{stage}}/{{name}}.wav",
            stage=SAMPLE_STAGES,
            name=sample_names(),
        ),
        scores=expand(f"{RESULTS}/eval/stage{{stage}}/scores.parquet", stage=EVAL_STAGES),
        topline=rules.evaluate_reference.output.topline,
        stage_toplines=expand(
            f"{RESULTS}/samples/stage{{stage}}/topline/{{name}}.wav",
            stage=SAMPLE_STAGES if SEMANTIC_CODES else [],
            name=sample_names(),
        ),
    output:
        page=report(
            directory(f"{REPORT_DIR}/samples"),
            htmlindex="index.html",
            caption="report/samples.rst",
            category="6. Samples",
        ),
    log:
        f"{LOGS}/report/samples.log",
    conda:
        "../envs/indextts.yaml"
    params:
        prompt_seconds=config["synthesize"]["prompt_seconds"],
        cfg=stage_config("report"),
        code=REPORT_CODE,
        topline=lambda wildcards, input: (
            f" --topline-dir {shlex.quote(os.path.dirname(input.topline[0]))}"
            if input.topline
            else ""
        ),
    shell:
        "indextts report-samples --config {params.cfg:q} --tables {input.tables:q}"
        " --out-dir {output.page:q} --prompt-seconds {params.prompt_seconds}"
        " --scores {input.scores:q}{params.topline} > {log:q} 2>&1"


rule report_export:
    input:
        folder=rules.export.output.folder,
    output:
        page=report(f"{REPORT_DIR}/export.html", caption="report/export.rst", category="7. Export"),
    log:
        f"{LOGS}/report/export.log",
    conda:
        "../envs/indextts.yaml"
    params:
        code=REPORT_CODE,
    shell:
        "indextts report-export --export-report {input.folder:q}/export_report.json"
        " --page {output.page:q} > {log:q} 2>&1"


_EXTRA_TARGETS.extend(
    [
        *rules.report_data.output,
        *expand(f"{REPORT_DIR}/stage{{stage}}/summary.html", stage=(1, 2, 3)),
        *rules.report_speaker.output,
        rules.report_export.output.page,
        *([f"{REPORT_DIR}/samples"] if SAMPLE_STAGES else []),
        *(rules.report_eval.output if EVAL_STAGES or PROBE_STAGES else []),
    ]
)
