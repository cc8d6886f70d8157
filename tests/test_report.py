"""The report: plots and pages from metrics, the samples page, and a real Snakemake report zip
opened in headless Chromium (every plot loads, every clip plays with its WAV's duration, the
samples page links back to the report)."""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from indextts.report import REPORT_FROM_SAMPLES, ReportConfig, ema, report_samples, report_stage

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DURATION_TOL = 0.1  # seconds, <audio> duration against the WAV's


def metrics_records(stage: int, steps: int = 60, K: int = 3) -> list[dict]:
    """A metrics.jsonl as the trainer writes it (train every 10 steps, val at 0, 30 and the end)."""
    rng = np.random.default_rng(stage)
    out = []
    for step in range(0, steps + 1, 10):
        base = {f"mel_loss/cb{k}": 3.0 - step / 40 + k * 0.1 + 0.05 * rng.random() for k in range(K)}
        common = {"text_loss": 5 - step / 30, "mel_loss": float(np.mean(list(base.values()))), **base}
        common["loss"] = 0.1 * common["text_loss"] + common["mel_loss"]
        if step:
            rec = {"step": step, "split": "train", "epoch": 0, **common, "lr": 1e-3 * min(1, step / 20),
                   "grad_norm": 1.0 + rng.random(), "tokens_per_s": 5000 + 100 * rng.random(), "data_wait": 0.05}
            if stage == 2:
                rec.update(speaker_loss=1.8 - step / 100, speaker_acc=0.15 + step / 100, grl_lambda=step / steps)
                if rec["speaker_acc"] > 0.6:
                    rec["warning"] = f"speaker_acc {rec['speaker_acc']:.3f} outside the healthy band [0.1, 0.6]"
            out.append(rec)
        if step in (0, 30, steps):
            out.append({"step": step, "split": "val", **common})
    return out


def write_stage(root: Path, stage: int) -> tuple[Path, Path]:
    folder = root / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    records = metrics_records(stage)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    vals = [r for r in records if r["split"] == "val"]
    meta = {"stage": f"stage{stage}", "step": 60, "training_type": "full", "model": {"preset": "tiny", "n_codebooks": 3},
            "extra": {"params": {"trainable": 1000, "total": 2000}, "first_val": vals[0], "final_val": vals[-1],
                      "val_mel_loss_drop": 0.25, "settings": {"lr": 1e-3, "healthy_acc": [0.1, 0.6]},
                      "data": {"train_utterances": 300, "dropped": {}, "padding_efficiency": 0.9}}}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder / "metrics.jsonl", folder / "model.json"


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.shape[1], img.shape[0]


def tone(path: Path, seconds: float, sr: int = 16000, f0: float = 220.0) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr)
    return path


def sample_tables(root: Path, stages=(1, 2)) -> dict[int, Path]:
    """samples.tsv + WAVs per stage, as synthesize_samples writes them, with prompts and references."""
    import pandas as pd

    audio = root / "audio"
    audio.mkdir()
    prompts = [tone(audio / f"p{i}.wav", 2.0 + i, f0=150 + 30 * i) for i in range(3)]  # 2, 3, 4 s
    refs = [tone(audio / f"r{i}.wav", 1.5 + 0.5 * i) for i in range(2)]
    tables = {}
    for stage in stages:
        out = root / f"stage{stage}"
        out.mkdir(exist_ok=True)
        rows = []
        for i, (name, emo) in enumerate((("same-00", ""), ("cross-00", str(prompts[2])))):
            sec = 1.0 + 0.7 * i + 0.3 * stage
            tone(out / f"{name}.wav", sec)
            rows.append({"name": name, "text": f"text {i} <b>&", "speaker_prompt": str(prompts[i]),
                         "emotion_prompt": emo, "kind": name[:-3], "speaker": f"spk{i}", "emotion_speaker": "spk2",
                         "emotion": "sad", "reference": str(refs[i]), "utt_id": f"u{i}", "frames": int(sec * 50),
                         "seconds": sec, "stop_reached": i == 0, "rtf": 0.2})
        pd.DataFrame(rows).to_csv(out / "samples.tsv", sep="\t", index=False)
        tables[stage] = out / "samples.tsv"
        # what indextts evaluate writes beside them (results/eval/stageN/scores.parquet)
        scored = root / "eval" / f"stage{stage}"
        scored.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"name": r["name"], "mcd": 6.5 - stage, "duration_ratio": 1.1, "log_f0_rmse": 0.2,
                       "retrieval_hit": float(i == 0), "retrieval_rank": 1 + 2 * i, "retrieval_n": 10}
                      for i, r in enumerate(rows)]).to_parquet(scored / "scores.parquet")
    topline = root / "eval" / "reference" / "topline"
    topline.mkdir(parents=True, exist_ok=True)
    for name, sec in (("same-00", 1.5), ("cross-00", 2.0)):
        tone(topline / f"{name}.wav", sec, f0=200)
    return tables


# --- pieces -------------------------------------------------------------------------------------


def test_ema_is_tensorboard_smoothing() -> None:
    assert ema([2.0, 2.0, 2.0], 0.6) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    w = 0.5
    want2 = (w * (1 - w) * 1.0 + (1 - w) * 3.0) / (1 - w**2)
    assert ema([1.0, 3.0], w) == pytest.approx([1.0, want2])
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_stage_plots_and_summary_from_metrics(tmp_path: Path) -> None:
    metrics, meta = write_stage(tmp_path, 2)
    out = tmp_path / "out"
    files = report_stage(ReportConfig(), 2, metrics=metrics, meta=meta, losses=out / "losses.png",
                         throughput=out / "tp.png", summary=out / "summary.html", speaker=out / "speaker.png")
    assert len(files) == 4
    for png in ("losses.png", "tp.png", "speaker.png"):
        w, h = png_size(out / png)
        assert w > 300 and h > 200
    page = (out / "summary.html").read_text()
    assert "warning(s)" in page and "outside the healthy band" in page  # the trainer's warnings are shown
    assert "mel_loss/cb2" in page and "25.0 %" in page
    # svg works too, and carries no creation date (same data, same file)
    svg = report_stage(ReportConfig(format="svg"), 2, metrics=metrics, meta=meta, speaker=out / "speaker.svg")[0]
    text = svg.read_text()
    assert text.startswith("<?xml") and "<dc:date>" not in text
    # Stage 1 has no speaker terms: its loss plot still draws. Its summary shows the transfer
    # report when the stage imported the released gpt.pth, and nothing of it otherwise.
    metrics1, meta1 = write_stage(tmp_path, 1)
    report_stage(ReportConfig(), 1, metrics=metrics1, meta=meta1, losses=out / "l1.png")
    assert png_size(out / "l1.png")[0] > 300
    transfer = tmp_path / "transfer_report.json"
    report_stage(ReportConfig(), 1, metrics=metrics1, meta=meta1, transfer=transfer, summary=out / "s1.html")
    assert "Transfer report" not in (out / "s1.html").read_text()
    transfer.write_text(json.dumps({
        "counts": {"loaded": 650, "transposed": 96, "transferred": 2, "reinitialised": 1, "unused": 0},
        "reinitialised": {"mel_embedding.weight": "shape [8194, 1280] in the file, [18, 1280] here"},
        "vocab": {"n_old": 12000, "n_new": 256, "shared": 120, "coverage": 0.47}}))
    report_stage(ReportConfig(), 1, metrics=metrics1, meta=meta1, transfer=transfer, summary=out / "s1.html")
    page = (out / "s1.html").read_text()
    assert "Transfer report" in page and "mel_embedding.weight" in page and "[18, 1280] here" in page


def test_stage_plot_draws_each_language_and_the_forgetting_warnings(tmp_path: Path) -> None:
    metrics, meta = write_stage(tmp_path, 1)
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    for k, r in enumerate(val):
        r.update({"lang/am/mel_loss": r["mel_loss"], "lang/en/mel_loss": 2.0 + 0.3 * k})
    rows.append({"step": val[-1]["step"], "split": "guard", "language": "en", "start_mel_loss": 2.0,
                 "mel_loss": 2.0 + 0.3 * (len(val) - 1), "warning": "forgetting: the base language 'en' val code loss rose"})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    report_stage(ReportConfig(format="svg"), 1, metrics=metrics, meta=meta, losses=out / "l.svg", summary=out / "s.html")
    svg = (out / "l.svg").read_text()
    assert "codes, en (val)" in svg and "codes, am (val)" in svg and "forgetting warning" in svg
    assert "forgetting: the base language" in (out / "s.html").read_text()


def test_samples_page_plays_every_clip_and_links_back(tmp_path: Path) -> None:
    tables = sample_tables(tmp_path)
    page = report_samples(tables, tmp_path / "page", prompt_seconds=2.5)
    text = page.read_text()
    srcs = re.findall(r'<audio controls preload="metadata" src="([^"]+)"', text)
    # per stage: 2 generated; prompts and references shared across stages
    assert sorted(s for s in srcs if s.startswith("stage")) == ["stage1/cross-00.wav", "stage1/same-00.wav",
                                                               "stage2/cross-00.wav", "stage2/same-00.wav"]
    for s in set(srcs):
        assert (tmp_path / "page" / s).is_file(), s
    prompts = sorted({s for s in srcs if s.startswith("prompts/")})
    assert len(prompts) == 3
    # prompts play as the model heard them: their first prompt_seconds (2, 3 and 4 s clips)
    assert sorted(round(sf.info(str(tmp_path / "page" / p)).duration, 3) for p in prompts) == [2.0, 2.5, 2.5]
    assert f'href="{REPORT_FROM_SAMPLES}"' in text
    assert "&lt;b&gt;&amp;" in text  # texts are escaped
    assert text.count("no (max length)") == 2  # cross-00 did not reach its stop token, in both stages
    assert "not evaluated" in text and "<img" not in text  # no scores given

    # With the evaluation's scores: each sample's scores, and the spectrograms of the generated
    # clip, the real recording and the codec topline side by side.
    scores = {s: tmp_path / "eval" / f"stage{s}" / "scores.parquet" for s in tables}
    page = report_samples(tables, tmp_path / "page2", prompt_seconds=2.5, scores=scores,
                          topline_dir=tmp_path / "eval" / "reference" / "topline")
    text = page.read_text()
    imgs = re.findall(r'<img src="([^"]+)"', text)
    assert sorted(imgs) == ["spectra/stage1_cross-00.png", "spectra/stage1_same-00.png",
                            "spectra/stage2_cross-00.png", "spectra/stage2_same-00.png"]
    for img in imgs:
        w, h = png_size(tmp_path / "page2" / img)
        assert w > 400 and h > 100
    assert "MCD-DTW 5.50 dB" in text and "right text retrieved" in text and "retrieval rank 3 of 10" in text


# --- the real report in a real browser ------------------------------------------------------------

CHECK_PAGE = """<!DOCTYPE html><html><body><pre id="out">pending</pre>
<iframe id="report" src="report/report.html" style="width:1200px;height:800px"></iframe>
<script>
const out = {images: [], audio: [], links: [], pages: [], page_images: [], errors: []};
const sleep = ms => new Promise(r => setTimeout(r, ms));
async function until(test, what, ms = 20000) {
  for (let t = 0; t < ms; t += 50) { const v = test(); if (v) return v; await sleep(50); }
  throw new Error("timed out waiting for " + what);
}
async function main() {
  const frame = document.getElementById("report");
  const w = frame.contentWindow;
  // The viewer's React app (a `let` global, hence eval; the #app element alone is not it).
  const app = await until(() => {
    try { return w.eval("typeof results === 'object' && app && app.setView ? app : null"); } catch (e) { return null; }
  }, "the report app");
  const results = w.eval("results");
  for (const [path, r] of Object.entries(results)) {
    const kind = r.mime_type.startsWith("image/") ? "img" : (r.mime_type === "text/html" ? "html" : null);
    if (!kind) continue;
    // What a person's click on the result does: the viewer shows it.
    app.setView({content: kind, contentPath: r.data_uri, resultPath: path});
    if (kind === "img") {
      const img = await until(() => [...w.document.querySelectorAll("img")].find(
        i => i.getAttribute("src") === r.data_uri && i.complete), "image " + path);
      out.images.push({path, w: img.naturalWidth, h: img.naturalHeight});
      continue;
    }
    const inner = await until(() => [...w.document.querySelectorAll("iframe")].find(
      f => f.getAttribute("src") === r.data_uri && f.contentDocument && f.contentDocument.readyState !== "loading"
           && f.contentWindow.location.href.endsWith(r.data_uri)), "page " + path);
    const doc = inner.contentDocument;
    out.pages.push({path, title: doc.title, tables: doc.querySelectorAll("table").length,
                    text: doc.body.innerText.slice(0, 4000)});
    for (const img of doc.querySelectorAll("img")) {
      await until(() => img.complete, "page image " + img.getAttribute("src"));
      out.page_images.push({page: path, src: img.getAttribute("src"), w: img.naturalWidth, h: img.naturalHeight});
    }
    for (const a of doc.querySelectorAll("audio")) {
      const d = await new Promise(res => {
        if (a.readyState >= 1) return res(a.duration);
        a.addEventListener("loadedmetadata", () => res(a.duration));
        a.addEventListener("error", () => res(-1));
        a.load();
      });
      out.audio.push({page: path, src: a.getAttribute("src"), url: new URL(a.getAttribute("src"), inner.contentWindow.location.href).pathname, duration: d});
    }
    for (const l of doc.querySelectorAll("a[href]")) {
      const url = new URL(l.getAttribute("href"), inner.contentWindow.location.href);
      const resp = await fetch(url);
      const body = await resp.text();
      out.links.push({page: path, path: url.pathname, status: resp.status, is_report: body.includes('id="results"')});
    }
  }
}
main().catch(e => out.errors.push(String(e))).finally(() => {
  document.getElementById("out").textContent = "RESULT " + JSON.stringify(out) + " END";
});
</script></body></html>
"""


@contextlib.contextmanager
def serve(root: Path):
    """A local HTTP server over ``root`` (one origin, so the check page can look into the report)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def open_in_chromium(report_zip: Path, work: Path) -> dict:
    """Unzip a Snakemake report and drive its viewer in headless Chromium: show every image and
    HTML result as a click would, wait for each image and each <audio> to load, follow each link
    of the HTML pages. Returns what the browser saw (sizes, durations, link statuses, errors)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs the Debian package)")
    with zipfile.ZipFile(report_zip) as z:
        z.extractall(work)
    names = [p for p in work.iterdir() if (p / "report.html").is_file()]
    assert len(names) == 1, f"expected one <name>/report.html in {report_zip}"
    if names[0].name != "report":
        names[0].rename(work / "report")
    (work / "check.html").write_text(CHECK_PAGE)
    # Chromium dumps the page when its virtual time budget runs out, and loading media does not
    # hold virtual time back: on a busy machine the dump can come before the check page has
    # finished (it still says "pending"; about one run in three here). Such a run says nothing
    # about the report, so it is run again, up to three times.
    with serve(work) as url:
        for _ in range(3):
            proc = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio", "--virtual-time-budget=120000",
                 "--dump-dom", f"{url}/check.html"], capture_output=True, text=True, timeout=240)
            m = re.search(r'<pre id="out">RESULT (.*?) END</pre>', proc.stdout, re.S)
            if m or '<pre id="out">pending</pre>' not in proc.stdout:
                break
    assert m, f"no result from chromium (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def check_report(seen: dict, root: Path, *, n_images: int, wav_of) -> None:
    """What a report must show: ``n_images`` plots that load with a size, every <audio> loads with
    its WAV's duration (``wav_of(url path) -> Path``), and every sample page links back to the
    report. Shared with the demo's workflow test."""
    assert not seen["errors"], seen["errors"]
    assert len(seen["images"]) == n_images, [i["path"] for i in seen["images"]]
    for img in seen["images"]:
        assert img["w"] > 0 and img["h"] > 0, img
    assert seen["audio"], "no <audio> element in any page"
    for a in seen["audio"]:
        wav = wav_of(a["url"])
        want = sf.info(str(wav)).duration
        assert abs(a["duration"] - want) <= DURATION_TOL, f"{a['src']}: <audio> {a['duration']} s, WAV {want} s"
    pages = {a["page"] for a in seen["audio"]}
    for page in pages:
        back = [link for link in seen["links"] if link["page"] == page]
        assert back and all(link["status"] == 200 and link["is_report"] for link in back), back
        assert any(link["path"] == "/report/report.html" for link in back)


REPORT_SNAKEFILE = """
rule all:
    input:
        "out/losses.png",
        "out/samples",

rule stage_plots:
    input:
        metrics="stage2/metrics.jsonl",
        meta="stage2/model.json",
    output:
        losses=report("out/losses.png", category="Stage 2"),
        speaker=report("out/speaker.png", category="Stage 2"),
    shell:
        "indextts report-stage --stage 2 --metrics {input.metrics} --meta {input.meta}"
        " --losses {output.losses} --speaker {output.speaker}"

rule samples:
    input:
        tables=["stage1/samples.tsv", "stage2/samples.tsv"],
        scores=["eval/stage1/scores.parquet", "eval/stage2/scores.parquet"],
    output:
        page=report(directory("out/samples"), htmlindex="index.html", category="Samples"),
    shell:
        "indextts report-samples --tables {input.tables} --out-dir {output.page} --prompt-seconds 2.5"
        " --scores {input.scores} --topline-dir eval/reference/topline"
"""


@pytest.mark.integration
def test_snakemake_report_zip_opens_in_chromium(tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    wf.mkdir()
    write_stage(wf, 2)
    sample_tables(wf)
    (wf / "Snakefile").write_text(REPORT_SNAKEFILE)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = dict(cwd=wf, capture_output=True, text=True, env=env, timeout=300)
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "1"], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(BIN / "snakemake"), "--report", "report.zip"], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = wf / "out/samples"

    def wav_of(url_path: str) -> Path:
        rel = url_path.split("/", 5)[5]  # /report/data/raw/<id>/<rel>
        return page / rel

    seen = open_in_chromium(wf / "report.zip", tmp_path / "view")
    check_report(seen, tmp_path / "view", n_images=2, wav_of=wav_of)
    # per stage and row: generated, speaker prompt, reference (+ the cross row's emotion prompt);
    # the prompt and reference files are shared by the stages
    assert len(seen["audio"]) == 2 * (2 * 3 + 1)
    assert len({a["src"] for a in seen["audio"]}) == 2 * 2 + 3 + 2
    # the samples page's spectrograms load in the browser, each with a size
    assert len(seen["page_images"]) == 4 and all(i["w"] > 400 and i["h"] > 100 for i in seen["page_images"])

    # The check can fail: a plot that is not an image, a clip whose duration is not its WAV's.
    broken = tmp_path / "view2"
    broken.mkdir()
    with zipfile.ZipFile(wf / "report.zip") as z, zipfile.ZipFile(tmp_path / "broken.zip", "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith("losses.png"):
                data = b"not a png"
            out.writestr(item, data)
    seen = open_in_chromium(tmp_path / "broken.zip", broken)
    with pytest.raises(AssertionError):
        check_report(seen, broken, n_images=2, wav_of=wav_of)
    with pytest.raises(AssertionError):
        check_report({**seen, "images": [{"path": "x", "w": 5, "h": 5}] * 2},
                     broken, n_images=2, wav_of=lambda u: page / "stage1/same-00.wav")
