"""The pieces of the Snakemake report (``snakemake --report results/report.zip``).

Each rule of ``rules/report.smk`` calls one command here and flags its outputs with
``report(...)``; Snakemake's own report gathers them by category. What a person sees:

* data: hours, speakers, rejects per reason, the vocabulary report (an HTML table), the duration
  histogram and the per-speaker one; when the ASR filter ran, its counts per reason, rejected
  share and edge silences, and its CER histogram;
* per stage: loss curves (train and val; total, text and every codebook's code loss), learning
  rate and non-pad tokens/s, a summary (parameters, val losses, warnings, the transfer report of
  an import); stage 2 also its speaker loss and accuracy with the healthy band and the GRL lambda;
* the samples as one HTML page with ``<audio>`` elements (Snakemake's viewer offers WAV files
  for download only), a ``report(directory(...), htmlindex=...)`` output whose audio travels in
  the zip beside it, with a link back to the report;
* the export report.

Plots are matplotlib (Agg) PNG or SVG; pages are plain HTML with inline CSS, no scripts.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from indextts.config import ConfigError, get_section, load_config_arg
from indextts.files import atomic_path

# The samples page sits at data/raw/<id>/index.html inside the report zip, three folders below
# report.html (Snakemake's layout for htmlindex results).
REPORT_FROM_SAMPLES = "../../../report.html"


@dataclass(frozen=True)
class ReportConfig:
    """The ``report`` config section: how plots are drawn."""

    format: Literal["png", "svg"] = "png"  # png: small and shown inline; svg: sharp at any zoom
    dpi: int = 110  # PNG resolution
    # Weight of the exponential moving average drawn over the train curves (TensorBoard's
    # smoothing; 0 draws the raw points only). Val points are never smoothed.
    smooth: float = 0.6

    def __post_init__(self) -> None:
        if self.dpi < 30:
            raise ConfigError(f"report.dpi must be at least 30, got {self.dpi}")
        if not 0.0 <= self.smooth < 1.0:
            raise ConfigError(f"report.smooth must be in [0, 1), got {self.smooth}")


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.35em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { color: #a40; } .ok { color: #060; } .muted { color: #777; font-size: 0.85em; }
audio { width: 220px; height: 32px; }
"""


def _esc(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return html.escape(str(value))


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, *, raw: Iterable[int] = ()) -> str:
    """An HTML table; numbers right-aligned; cells in column indices ``raw`` are inserted as HTML."""
    raw = set(raw)
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{v if i in raw else _esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{_esc(title)}</h1>\n{body}\n</body></html>\n")


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _kv(mapping: Mapping[str, Any]) -> str:
    return html_table([(k, v if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False))
                       for k, v in mapping.items()])


# --- plots --------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, cfg: ReportConfig) -> Path:
    """Save and close ``fig`` atomically, without a creation date (same data, same file)."""
    plt = _plt()
    path = Path(path)
    fmt = path.suffix.lstrip(".") or cfg.format
    meta = {"Date": None} if fmt == "svg" else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=cfg.dpi, bbox_inches="tight", metadata=meta)
    plt.close(fig)
    return path


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else v)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _curve(ax, records, key: str, label: str, color, cfg: ReportConfig) -> bool:
    """Train (raw + smoothed) and val (markers) of one metric; False when neither exists."""
    xs, ys = _series(records, "train", key)
    vx, vy = _series(records, "val", key)
    if xs:
        if cfg.smooth > 0 and len(xs) > 2:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            ax.plot(xs, ema(ys, cfg.smooth), color=color, linewidth=1.6, label=f"{label} (train)")
        else:
            ax.plot(xs, ys, color=color, linewidth=1.6, label=f"{label} (train)")
    if vx:
        ax.plot(vx, vy, color=color, marker="o", linestyle="--", linewidth=1, markersize=4, label=f"{label} (val)")
    return bool(xs or vx)


def _codebook_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = {k for r in records for k in r if k.startswith("mel_loss/cb")}
    return sorted(keys, key=lambda k: int(k.rsplit("cb", 1)[1]))


def plot_losses(records: Sequence[Mapping[str, Any]], path: str | Path, cfg: ReportConfig, title: str) -> Path:
    """Loss (total and text) and code loss (mean and each codebook's), train and val."""
    plt = _plt()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    _curve(a, records, "loss", "loss", colors[0], cfg)
    _curve(a, records, "text_loss", "text", colors[1], cfg)
    a.set_title("total and text loss")
    _curve(b, records, "mel_loss", "codes (mean)", "black", cfg)
    for i, key in enumerate(_codebook_keys(records)):
        _curve(b, records, key, key.split("/")[1], colors[(i + 2) % len(colors)], cfg)
    # Per-language val code losses (several languages in val, e.g. data.replay's base ones) and the
    # forgetting guard's warnings (``split: guard``) as red lines at their steps.
    langs = sorted({k.split("/")[1] for r in records if r.get("split") == "val" for k in r
                    if k.startswith("lang/") and k.endswith("/mel_loss")})
    for i, lang in enumerate(langs):
        vx, vy = _series(records, "val", f"lang/{lang}/mel_loss")
        b.plot(vx, vy, color=colors[(i + 5) % len(colors)], marker="s", linestyle=":", linewidth=1, markersize=3,
               label=f"codes, {lang} (val)")
    for j, step in enumerate(sorted({r["step"] for r in records if r.get("split") == "guard"})):
        b.axvline(step, color="red", alpha=0.5, linewidth=1, label="forgetting warning" if j == 0 else None)
    b.set_title("code loss per codebook" + (" and language" if langs else ""))
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path, cfg)


def plot_throughput(records: Sequence[Mapping[str, Any]], path: str | Path, cfg: ReportConfig, title: str) -> Path:
    """Learning rate, non-pad tokens/s and the gradient norm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    for ax, key, label in zip(axes, ("lr", "tokens_per_s", "grad_norm"),
                              ("learning rate", "non-pad tokens / s", "gradient norm (before clipping)")):
        xs, ys = _series(records, "train", key)
        ax.plot(xs, ys, marker=".", linewidth=1.4)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, cfg)


def plot_speaker(records: Sequence[Mapping[str, Any]], path: str | Path, cfg: ReportConfig,
                 healthy: Sequence[float] | None, title: str) -> Path:
    """Stage 2: speaker loss, speaker accuracy with the healthy band drawn, the GRL lambda."""
    plt = _plt()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    _curve(a, records, "speaker_loss", "speaker CE", colors[0], cfg)
    a.set_title("speaker classifier loss (on emo_vec)")
    if healthy:
        lo, hi = healthy
        b.axhspan(lo, hi, color="green", alpha=0.12, label=f"healthy band [{lo}, {hi}]")
    _curve(b, records, "speaker_acc", "accuracy", colors[1], cfg)
    b.set_ylim(0, 1)
    b.set_title("speaker accuracy")
    xs, ys = _series(records, "train", "grl_lambda")
    c.plot(xs, ys, color=colors[2], marker=".")
    c.set_title("GRL lambda")
    for ax in (a, b, c):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in (a, b):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path, cfg)


def plot_durations(durations: Sequence[float], splits: Sequence[str], path: str | Path, cfg: ReportConfig) -> Path:
    """Histogram of kept utterance durations, train and val stacked."""
    plt = _plt()
    import numpy as np

    d, s = np.asarray(durations, dtype=float), np.asarray(splits)
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    bins = np.linspace(0, max(1.0, float(d.max()) if d.size else 1.0), 31)
    groups = [(d[s == name], name) for name in ("train", "val") if (s == name).any()]
    ax.hist([g for g, _ in groups], bins=bins, stacked=True, label=[f"{n} ({len(g)})" for g, n in groups])
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.set_title(f"durations of the {len(d)} kept utterances ({d.sum() / 3600:.2f} h)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, cfg)


def plot_speakers(speakers: Sequence[str], durations: Sequence[float], splits: Sequence[str],
                  selected: Iterable[str], path: str | Path, cfg: ReportConfig, max_bars: int = 40) -> Path:
    """Per-speaker minutes (train/val stacked, stage-2 speakers marked) for up to ``max_bars``
    speakers; beyond that, a histogram of minutes per speaker on a log axis."""
    plt = _plt()
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"speaker": list(speakers), "minutes": np.asarray(durations, float) / 60, "split": list(splits)})
    per = frame.pivot_table(index="speaker", columns="split", values="minutes", aggfunc="sum", fill_value=0.0)
    per = per.reindex(columns=[c for c in ("train", "val") if c in per.columns])
    per = per.loc[per.sum(axis=1).sort_values(ascending=False).index]
    chosen = set(selected)
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    if len(per) <= max_bars:
        bottom = np.zeros(len(per))
        for col in per.columns:
            ax.bar(range(len(per)), per[col].to_numpy(), bottom=bottom, label=col)
            bottom += per[col].to_numpy()
        ax.set_xticks(range(len(per)))
        ax.set_xticklabels([f"{s}{' *' if s in chosen else ''}" for s in per.index], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("minutes")
        ax.set_title(f"{len(per)} speakers (* = a stage-2 classifier class)")
        ax.legend()
    else:
        total = per.sum(axis=1).to_numpy()
        bins = np.logspace(math.log10(max(total.min(), 1e-3)), math.log10(total.max() + 1e-9), 30)
        ax.hist(total, bins=bins)
        ax.set_xscale("log")
        ax.set_xlabel("minutes per speaker")
        ax.set_ylabel("speakers")
        ax.set_title(f"{len(per)} speakers, {len(chosen)} chosen for the stage-2 classifier")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, cfg)


def plot_asr_cer(asr: Mapping[str, Any], path: str | Path, cfg: ReportConfig) -> Path:
    """The ASR filter's CER histogram (``asr_summary.json``) with its threshold drawn in."""
    plt = _plt()

    hist = asr["cer"]["histogram"]
    edges, counts = hist["edges"], list(hist["counts"])
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    ax.bar(edges[:-1], counts, width=width, align="edge", label="clips")
    if hist.get("above_1"):
        ax.bar([edges[-1]], [hist["above_1"]], width=width, align="edge", color="tab:red", label="CER > 1")
    ax.axvline(asr["max_cer"], color="k", ls="--", label=f"max_cer {asr['max_cer']}")
    ax.set_xlabel("CER (hypothesis vs transcript)")
    ax.set_ylabel("clips")
    model = (asr.get("model") or {}).get("name") or "ASR"
    ax.set_title(f"{asr['cer'].get('n', 0)} clips by {model}: {asr['rejected']} of {asr['input_rows']} rejected "
                 f"({100 * asr['rejected_share']:.1f} %)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, cfg)


def _asr_section(a: Mapping[str, Any]) -> list[str]:
    """The data page's rows for the ASR filter's summary."""
    cer = a.get("cer") or {}
    model = a.get("model") or {}
    rows = [
        ("model", f"{model.get('name')} (sha256 {str(model.get('sha256'))[:12]})"),
        ("clips in", a.get("input_rows")), ("kept", a.get("kept")), ("rejected", a.get("rejected")),
        ("rejected share", f"{100 * a.get('rejected_share', 0):.2f} %"),
        ("kept + rejected = input", "yes" if a.get("reconciled") else "NO"),
        ("hours kept", a.get("hours_kept")),
        ("max_cer", a.get("max_cer")), ("min_edge_silence (s)", a.get("min_edge_silence")),
        *((f"CER {k}", cer[k]) for k in ("mean", "p5", "median", "p95") if k in cer),
        *((f"{end} silence median (s)", (a.get(f"{end}_silence") or {}).get("median")) for end in ("leading", "trailing")),
        ("clips without detected speech", a.get("no_speech_detected")),
    ]
    reasons = sorted((a.get("rejected_by_reason") or {}).items(), key=lambda kv: -kv[1])
    return ["<h2>ASR filter</h2>", html_table(rows),
            html_table([(k, n) for k, n in reasons], ("reason", "rows")),
            '<p class="muted">Every rejected clip, with its hypothesis, CER and edge silences: '
            "clean/asr_rejects.parquet.</p>"]


# --- the pieces ---------------------------------------------------------------------------------


def report_data(cfg: ReportConfig, *, summary: Path, clean: Path, vocab_report: Path, speakers: Path,
                page: Path, durations_plot: Path, speakers_plot: Path, asr_summary: Path | None = None,
                asr_cer_plot: Path | None = None) -> list[Path]:
    """Data summary page (hours, speakers, rejects per reason, vocab report, speaker selection) and
    the duration and per-speaker histograms; with the ASR filter's ``asr_summary`` also its counts
    on the page and its CER histogram (``asr_cer_plot``)."""
    import pandas as pd

    s = json.loads(Path(summary).read_text(encoding="utf-8"))
    v = json.loads(Path(vocab_report).read_text(encoding="utf-8"))
    spk = json.loads(Path(speakers).read_text(encoding="utf-8"))
    frame = pd.read_parquet(clean, columns=["speaker", "duration", "split"])
    hours = s.get("hours_by_split", {})
    body = ["<h2>Corpus</h2>", html_table([
        ("input rows", s.get("input_rows")), ("kept", s.get("kept")), ("rejected", s.get("rejected")),
        ("kept + rejected = input", "yes" if s.get("reconciled") else "NO"),
        ("hours kept", s.get("hours_kept")), *((f"hours {k}", h) for k, h in hours.items()),
        *((f"utterances {k}", n) for k, n in s.get("utterances_by_split", {}).items()),
        ("speakers", s.get("speakers")),
        ("languages", ", ".join(f"{k}: {n}" for k, n in (s.get("languages") or {}).items())),
        ("emotions", ", ".join(f"{k}: {n}" for k, n in (s.get("emotions") or {}).items()) or "none"),
    ])]
    reasons = sorted((s.get("rejected_by_reason") or {}).items(), key=lambda kv: -kv[1])
    body += ["<h2>Rejects per reason</h2>", html_table([(k, n) for k, n in reasons], ("reason", "rows"))]
    asr = json.loads(Path(asr_summary).read_text(encoding="utf-8")) if asr_summary else None
    if asr is not None:
        body[1:1] = [f'<p class="muted">Cleaning kept {s.get("kept")} clips; the ASR filter kept {asr.get("kept")} '
                     "of them (below). The tables count cleaning's rows.</p>"]
        body += _asr_section(asr)
    body += ["<h2>Vocabulary</h2>", html_table([
        ("mode", v.get("mode")), ("model type", v.get("model_type")), ("pieces", v.get("vocab_size")),
        ("val utterances", v.get("val_utterances")), ("val tokens", v.get("val_tokens")),
        ("UNK ratio (val)", v.get("unk_ratio")), ("UNK ratio allowed", v.get("max_unk_ratio")),
        ("character coverage (val)", v.get("val_char_coverage")),
        ("mean tokens / utterance", ", ".join(f"{k}: {x:.2f}" for k, x in (v.get("mean_tokens_per_utterance") or {}).items())),
        *((k, json.dumps(x, ensure_ascii=False)) for k, x in v.items()
          if k in ("shared_with_base", "base_pieces", "new_pieces", "worst_chars") and x),
    ])]
    stats = spk.get("stats", {})
    body += ["<h2>Speakers for the stage-2 classifier</h2>", _kv(stats)]
    write_text(page, html_page("Data", "\n".join(body)))
    plot_durations(frame["duration"].to_numpy(), frame["split"].astype(str).to_numpy(), durations_plot, cfg)
    selected = (spk.get("speakers") or {}).keys()
    plot_speakers(frame["speaker"].astype(str).tolist(), frame["duration"].to_numpy(), frame["split"].astype(str).tolist(),
                  selected, speakers_plot, cfg)
    out = [Path(page), Path(durations_plot), Path(speakers_plot)]
    if asr is not None and asr_cer_plot is not None:
        out.append(plot_asr_cer(asr, asr_cer_plot, cfg))
    return out


def stage_summary(stage: int, meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                  transfer: Mapping[str, Any] | None) -> str:
    """The HTML summary of one stage: what it trained, how the val losses moved, warnings, and the
    transfer report when stage 1 imported a released gpt.pth."""
    extra = meta.get("extra") or {}
    params = extra.get("params") or {}
    first, final = extra.get("first_val") or {}, extra.get("final_val") or {}
    body = ["<h2>Run</h2>", html_table([
        ("stage", meta.get("stage")), ("steps", meta.get("step")), ("training type", meta.get("training_type")),
        ("parameters trainable / total", f"{params.get('trainable', 0):,} / {params.get('total', 0):,}"),
        ("model", f"preset {meta['model'].get('preset')}, {meta['model'].get('n_codebooks')} codebook(s)"),
        ("train utterances", (extra.get("data") or {}).get("train_utterances")),
        ("dropped", json.dumps((extra.get("data") or {}).get("dropped"))),
        ("padding efficiency", (extra.get("data") or {}).get("padding_efficiency")),
        ("val code loss drop", f"{100 * extra['val_mel_loss_drop']:.1f} %" if "val_mel_loss_drop" in extra else "n/a"),
    ])]
    keys = [k for k in ("loss", "text_loss", "mel_loss", *sorted(k for k in final if k.startswith("mel_loss/")),
                        "speaker_loss", "speaker_acc") if k in first or k in final]
    body += ["<h2>Val losses</h2>", html_table([(k, first.get(k, ""), final.get(k, "")) for k in keys],
                                                ("metric", "first", "final"))]
    warnings = [r for r in records if r.get("warning")]
    if warnings:
        body += [f'<h2 class="warn">{len(warnings)} warning(s)</h2>',
                 html_table([(r["step"], r["warning"]) for r in warnings[:50]], ("step", "warning"))]
    body += ["<h2>Settings</h2>", _kv(extra.get("settings") or {})]
    if transfer:
        counts = transfer.get("counts") or {}
        body += ["<h2>Transfer report (import of the released gpt.pth)</h2>", _kv(counts)]
        re_init = transfer.get("reinitialised") or {}
        if re_init:
            body += ["<p>Re-initialised (left at fresh initialisation):</p>",
                     html_table(sorted(re_init.items())[:200], ("key", "reason"))]
        if transfer.get("vocab"):
            body += ["<p>Vocabulary transfer by piece string:</p>", _kv(transfer["vocab"])]
    return html_page(f"Stage {stage}", "\n".join(body))


def report_stage(cfg: ReportConfig, stage: int, *, metrics: Path, meta: Path, transfer: Path | None = None,
                 losses: Path | None = None, throughput: Path | None = None, summary: Path | None = None,
                 speaker: Path | None = None) -> list[Path]:
    """The plots and summary of one stage; each output is written when its path is given."""
    records = read_metrics(metrics)
    rec = json.loads(Path(meta).read_text(encoding="utf-8"))
    name = {1: "basic", 2: "disentangle", 3: "fine-tune"}.get(stage, "")
    out = []
    if losses:
        out.append(plot_losses(records, losses, cfg, f"stage {stage} ({name}): losses"))
    if throughput:
        out.append(plot_throughput(records, throughput, cfg, f"stage {stage} ({name}): optimiser and throughput"))
    if speaker:
        healthy = ((rec.get("extra") or {}).get("settings") or {}).get("healthy_acc")
        out.append(plot_speaker(records, speaker, cfg, healthy, f"stage {stage} ({name}): speaker-adversarial terms"))
    if summary:
        # Stage 1 writes a transfer report only when it imported the released gpt.pth.
        tr = json.loads(Path(transfer).read_text(encoding="utf-8")) if transfer and Path(transfer).is_file() else None
        out.append(write_text(summary, stage_summary(stage, rec, records, tr)))
    return out


def _copy_audio(src: str | Path, dest: Path, seconds: float | None = None) -> Path:
    """``src`` as a 16-bit WAV at its own rate (the first ``seconds`` when given)."""
    import soundfile as sf

    data, sr = sf.read(str(src), dtype="float32", always_2d=True)
    if seconds is not None:
        data = data[: int(seconds * sr)]
    with atomic_path(dest) as tmp:
        sf.write(str(tmp), data, sr, subtype="PCM_16", format="WAV")
    return dest


def _sample_scores(row: Mapping[str, Any]) -> str:
    """One sample's evaluation scores as a short HTML line (those measured)."""
    parts = []
    for key, label, fmt in (("mcd", "MCD-DTW", "{:.2f} dB"), ("duration_ratio", "duration", "{:.2f}×"),
                            ("log_f0_rmse", "log-F0 RMSE", "{:.3f}"), ("cer", "CER", "{:.3f}"), ("sim", "SIM", "{:.3f}")):
        v = row.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{label} {fmt.format(v)}")
    hit = row.get("retrieval_hit")
    if hit is not None and not math.isnan(hit):
        parts.append('<span class="ok">right text retrieved</span>' if hit else
                     f'<span class="warn">retrieval rank {int(row.get("retrieval_rank", -1))} of '
                     f'{int(row.get("retrieval_n", 0))}</span>')
    return _esc(", ".join(p for p in parts if "<span" not in p)) + "".join(f"<br>{p}" for p in parts if "<span" in p)


def report_samples(tables: Mapping[int, Path], out_dir: Path, *, prompt_seconds: float,
                   scores: Mapping[int, Path] | None = None, topline_dir: Path | None = None,
                   cfg: ReportConfig | None = None) -> Path:
    """The samples page: ``out_dir/index.html`` with one table per stage and every clip playable
    (the generated WAVs, the prompts as the model heard them, the real recordings of the texts).

    Args:
        tables: stage -> its ``samples.tsv`` (the WAVs lie beside it as ``<name>.wav``).
        out_dir: the page's folder (a ``report(directory(...), htmlindex="index.html")`` output).
        prompt_seconds: the crop synthesis applied to the prompts (``synthesize.prompt_seconds``).
        scores: stage -> its evaluation ``scores.parquet``; each sample then shows its MCD-DTW,
            duration ratio, retrieval hit (and CER, SIM when measured) and the log-mel spectrograms
            of the generated clip, the real recording and the codec topline side by side.
        topline_dir: ``evaluate-reference``'s ``topline/`` folder (``<name>.wav``); without it, a
            ``topline/`` folder beside a stage's table (semantic codes' per-stage topline) is shown.
    """
    import pandas as pd

    cfg = cfg or ReportConfig()
    scores = scores or {}

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    clips: dict[tuple[str, str], str] = {}

    def clip(kind: str, src: str, seconds: float | None = None) -> str:
        if not src:
            return ""
        key = (kind, src)
        if key not in clips:
            rel = f"{kind}/{len([k for k in clips if k[0] == kind]):03d}_{Path(src).stem}.wav"
            _copy_audio(src, out_dir / rel, seconds)
            clips[key] = rel
        return clips[key]

    def audio(rel: str) -> str:
        return f'<audio controls preload="metadata" src="{html.escape(rel)}"></audio>' if rel else ""

    body = [f'<p><a href="{REPORT_FROM_SAMPLES}" target="_top">&larr; back to the report</a></p>',
            "<p>Each stage speaks the same texts (val utterances: their recordings were never trained on) with "
            "held-out prompts of the same speaker (<i>same</i>), in one speaker's timbre with another speaker's "
            "emotion prompt (<i>cross</i>), and, where clean.val_text_fraction holds texts out, texts training never "
            "saw (<i>novel</i>), and, with data.replay, texts in the languages the pretrained model already speaks "
            f"(<i>base</i>). Prompts play as the model heard them (their first {prompt_seconds:g} s). RTF: wall time "
            "of the batch over the audio it produced.</p>"]
    for stage in sorted(tables):
        table = pd.read_csv(tables[stage], sep="\t", dtype=str, keep_default_na=False)
        score_rows = ({r["name"]: r for r in pd.read_parquet(scores[stage]).to_dict("records")}
                      if stage in scores else {})
        rows = []
        for r in table.to_dict("records"):
            gen = f"stage{stage}/{r['name']}.wav"
            dest = out_dir / gen
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tables[stage]).parent / f"{r['name']}.wav", dest)
            stopped = r.get("stop_reached") == "True"
            sc = score_rows.get(r["name"])
            measured = _sample_scores(sc) if sc is not None else '<span class="muted">not evaluated</span>'
            if sc is not None:
                spec = f"spectra/stage{stage}_{r['name']}.png"
                clips3 = [("generated", dest), ("real recording", r.get("reference", ""))]
                # The codec topline (DAC), or the stage's own (semantic codes: the real codes voiced
                # through this stage, beside its samples).
                top, label = ((Path(topline_dir) / f"{r['name']}.wav", "codec topline") if topline_dir else
                              (Path(tables[stage]).parent / "topline" / f"{r['name']}.wav", "topline (real codes)"))
                if top.is_file():
                    clips3.append((label, top))
                plot_spectrograms([c for c in clips3 if c[1]], out_dir / spec, cfg, f"stage {stage}, {r['name']}")
                measured += f'<br><img src="{html.escape(spec)}" alt="log-mel spectrograms" style="max-width:560px">'
            rows.append((
                r["name"], r["text"], audio(gen),
                f"{_esc(r.get('speaker', ''))}<br>{audio(clip('prompts', r['speaker_prompt'], prompt_seconds))}",
                (f"{_esc(r.get('emotion_speaker', ''))} {_esc(r.get('emotion', ''))}<br>"
                 f"{audio(clip('prompts', r['emotion_prompt'], prompt_seconds))}" if r.get("emotion_prompt") else
                 '<span class="muted">speaker prompt</span>'),
                audio(clip("references", r.get("reference", ""))),
                int(r["frames"]), float(r["seconds"]),
                '<span class="ok">yes</span>' if stopped else '<span class="warn">no (max length)</span>',
                float(r["rtf"]), measured,
            ))
        body += [f"<h2>Stage {stage}</h2>", html_table(
            rows, ("name", "text", "generated", "speaker prompt", "emotion prompt", "real recording", "frames",
                   "seconds", "stop reached", "RTF", "scores (evaluation)"), raw=(2, 3, 4, 5, 8, 10))]
    return write_text(out_dir / "index.html", html_page("Samples per stage", "\n".join(body)))


# --- evaluation ---------------------------------------------------------------------------------

# The measures of ``indextts evaluate`` in the order the report shows them: (key, label, better).
EVAL_MEASURES = (
    ("retrieval_hit", "text retrieval top-1", "higher"),
    ("mcd", "MCD-DTW (dB)", "lower"),
    ("log_f0_rmse", "log-F0 RMSE", "lower"),
    ("vuv_error", "voicing error", "lower"),
    ("duration_ratio", "duration ratio (gen / real)", "near 1"),
    ("stop_reached", "stop token reached", "higher"),
    ("cer", "CER", "lower"),
    ("wer", "WER", "lower"),
    ("sim", "speaker similarity (prompt)", "higher"),
    ("sim_emotion", "similarity to emotion prompt (cross)", "lower"),
)


def _ci(s: Mapping[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return ""
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _mean(s: Mapping[str, Any] | None) -> str:
    return f"{s['mean']:.3f}" if s and s.get("n") else ""


def plot_eval(summaries: Mapping[int, Mapping[str, Any]], path: str | Path, cfg: ReportConfig) -> Path:
    """One panel per measure: each stage's mean with its 95% interval, the topline and the floor
    as horizontal lines (chance for retrieval)."""
    plt = _plt()
    stages = sorted(summaries)
    keys = [m for m in EVAL_MEASURES if any((summaries[s]["measures"].get(m[0]) or {}).get("n") for s in stages)]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), layout="constrained", squeeze=False)
    for ax, (key, label, better) in zip(axes.flat, keys):
        got = [(s, summaries[s]["measures"].get(key)) for s in stages]
        got = [(s, m) for s, m in got if m and m.get("n")]
        xs = [s for s, _ in got]
        ys = [m["mean"] for _, m in got]
        err = [[m["mean"] - m["ci_low"] for _, m in got], [m["ci_high"] - m["mean"] for _, m in got]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="generated")
        last = summaries[stages[-1]]
        for system, style, color in (("topline", "--", "green"), ("floor", ":", "red"), ("real", "-.", "gray")):
            ref = (last.get(system) or {}).get(key)
            if ref and ref.get("n"):
                ax.axhline(ref["mean"], linestyle=style, color=color, label=system)
        if key == "retrieval_hit" and last.get("retrieval_chance") is not None:
            ax.axhline(last["retrieval_chance"], linestyle=":", color="black", label="chance")
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.set_xticks(stages, [f"stage {s}" for s in stages])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Evaluation of each stage's samples (mean, 95% bootstrap interval)")
    return save_figure(fig, path, cfg)


def eval_page(summaries: Mapping[int, Mapping[str, Any]], probes: Mapping[int, Mapping[str, Any]],
              plot_name: str | None = None) -> str:
    """The evaluation page: every measure per stage with its interval, the topline, the floor and
    n; the stages that do not yet speak; the disentanglement probes."""
    stages = sorted(summaries)
    last = summaries[stages[-1]] if stages else {}
    models = last.get("models") or {}
    body = []
    for s in stages:
        for why in summaries[s].get("does_not_speak") or []:
            body.append(f'<p class="warn"><b>Stage {s} does not yet speak the text:</b> {_esc(why)}</p>')
    body.append(
        "<p>Each stage's samples (val utterances, whose recordings were never trained on; <i>novel</i> ones read "
        "texts training never saw, <i>base</i> ones are in a base language: both are scored in the by-kind table "
        "only, never in the headline) are scored against the real recording of the same "
        "text. <b>Topline</b>: that recording through the codec, with the codebooks the model learns (the best any "
        "model on these codes can do). <b>Floor</b>: a real recording of the same speaker with another text (what "
        "a model that learned nothing of the text scores). <b>Real</b>: the recording itself (the ASR's own error, "
        "the speaker model's ceiling). Text retrieval: the right text's recording is the nearest (MCD-DTW) among "
        f"real recordings of that speaker with other texts; chance {last.get('retrieval_chance') or 0:.2f}. "
        "Values: mean [95% bootstrap interval].</p>")
    header = ["measure", "better", *[f"stage {s}" for s in stages], "topline", "floor", "real", "n"]
    rows = []
    for key, label, better in EVAL_MEASURES:
        cells = [(summaries[s]["measures"].get(key)) for s in stages]
        if not any(c and c.get("n") for c in cells):
            continue
        n = max((c or {}).get("n") or 0 for c in cells)
        rows.append((label, better, *[_ci(c) for c in cells], _mean((last.get("topline") or {}).get(key)),
                     _mean((last.get("floor") or {}).get(key)), _mean((last.get("real") or {}).get(key)), n))
    body += ["<h2>Scores per stage</h2>", html_table(rows, header)]
    off = [f"{what} (set eval.{key}.path to a local model folder)" for key, what in
           (("asr", "CER/WER"), ("speaker", "speaker similarity")) if not models.get(key)]
    used = [f"{what}: {models[key]}" for key, what in (("asr", "ASR"), ("speaker", "speaker model")) if models.get(key)]
    if used:
        body.append(f"<p>Models: {_esc('; '.join(used))}.</p>")
    if off:
        body.append(f"<p class=\"muted\">Not measured: {_esc('; '.join(off))}.</p>")
    kinds = sorted({k for s in stages for k in (summaries[s].get("by_kind") or {})})
    if kinds:
        krows = []
        for s in stages:
            for k in kinds:
                m = (summaries[s].get("by_kind") or {}).get(k) or {}
                krows.append((f"stage {s}", k, _ci(m.get("retrieval_hit")), _ci(m.get("mcd")),
                               _ci(m.get("duration_ratio")), (m.get("mcd") or {}).get("n", 0)))
        body += ["<h2>By sample kind</h2>", html_table(krows, ("stage", "kind", "retrieval top-1", "MCD-DTW",
                                                               "duration ratio", "n"))]
    if plot_name:
        body.append(f'<p><img src="{html.escape(plot_name)}" style="max-width:100%"></p>')
    if probes:
        names = sorted({k for s in probes for k in (probes[s].get("probes") or {})})
        prow = []
        for name in names:
            cells = [(probes[s].get("probes") or {}).get(name) or {} for s in sorted(probes)]
            first = next((c for c in cells if c), {})
            prow.append((name.replace("_", " "), *[f"{c['accuracy']:.3f}" if c.get("accuracy") is not None else
                                                   _esc(c.get("note") or "") for c in cells],
                         first.get("chance", ""), first.get("majority", ""), first.get("n", ""), first.get("k", "")))
        body += ["<h2>Disentanglement probes</h2>",
                 "<p>Cross-validated logistic regressions on each frozen stage's <code>emo_vec</code> and speaker "
                 "latents of held-out utterances. Stage 2's gradient reversal should push speaker accuracy from "
                 "<code>emo_vec</code> toward chance while emotion accuracy holds; the speaker latents are the "
                 "control.</p>",
                 html_table(prow, ("probe", *[f"stage {s}" for s in sorted(probes)], "chance", "majority", "n", "k"))]
    return html_page("Evaluation", "\n".join(body))


def report_eval(cfg: ReportConfig, summaries: Mapping[int, Path], probes: Mapping[int, Path], *, page: Path,
                plot: Path) -> list[Path]:
    """The report's evaluation category: the page (table, warnings, probes) and the plot."""
    sums = {s: json.loads(Path(p).read_text(encoding="utf-8")) for s, p in summaries.items()}
    prb = {s: json.loads(Path(p).read_text(encoding="utf-8")) for s, p in probes.items()}
    out = [plot_eval(sums, plot, cfg)]
    out.append(write_text(page, eval_page(sums, prb)))
    return out


def plot_spectrograms(clips: Sequence[tuple[str, str | Path]], path: Path, cfg: ReportConfig, title: str) -> Path:
    """Log-mel spectrograms of ``(label, wav)`` clips side by side, on one colour scale."""
    import librosa
    import soundfile as sf

    plt = _plt()
    mels = []
    for label, wav in clips:
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
        audio = librosa.resample(audio.mean(axis=1), orig_sr=sr, target_sr=16000) if sr != 16000 else audio.mean(axis=1)
        mel = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=1024, hop_length=160, n_mels=80)
        mels.append((label, librosa.power_to_db(mel, ref=1.0, top_db=None), audio.shape[0] / 16000))
    vmax = max(float(m.max()) for _, m, _ in mels)
    fig, axes = plt.subplots(1, len(mels), figsize=(3.2 * len(mels), 2.2), layout="constrained", squeeze=False)
    for ax, (label, mel, secs) in zip(axes[0], mels):
        ax.imshow(mel, origin="lower", aspect="auto", vmin=vmax - 80, vmax=vmax, cmap="magma",
                  extent=(0, secs, 0, mel.shape[0]))
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("s", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, ReportConfig(format="png", dpi=min(cfg.dpi, 90), smooth=cfg.smooth))


def report_export(export_report: Path, page: Path) -> Path:
    """The export report as a page: files, the re-import check, what IndexTTS2 can and cannot do."""
    r = json.loads(Path(export_report).read_text(encoding="utf-8"))
    cap = r.get("indextts2") or {}
    check = r.get("reimport") or {}
    body = ["<h2>What was exported</h2>", html_table([
        ("from", f"{r.get('checkpoint')} ({r.get('stage')}, step {r.get('step')})"),
        ("codebooks", r.get("n_codebooks")), ("codec", json.dumps(r.get("codec"))),
        ("layout", "official gpt.pth" if cap.get("official_layout") else "our checkpoint folder"),
        ("files", ", ".join(r.get("files") or [])), ("released config kept", r.get("released_config") or "none given"),
    ])]
    if r.get("official_refused"):
        body += [f'<p class="warn">Official layout refused: {_esc(r["official_refused"])}</p>']
    body += ["<h2>Re-import check</h2>", html_table([
        ("how", check.get("how")), ("identical outputs", "yes" if check.get("identical") else "NO"),
        ("largest difference", check.get("max_abs_diff")), ("differing tensors", len(check.get("differing_tensors") or [])),
    ])]
    body += ["<h2>With IndexTTS2's own inference</h2>", "<p>It can:</p><ul>"
             + "".join(f"<li>{_esc(x)}</li>" for x in cap.get("can") or ["nothing listed"]) + "</ul>",
             "<p>It cannot:</p><ul>" + "".join(f"<li>{_esc(x)}</li>" for x in cap.get("cannot") or ["nothing listed"])
             + "</ul>", f"<p class=\"muted\">{_esc(r.get('positions', ''))}</p>"]
    return write_text(page, html_page("Export", "\n".join(body)))


# --- CLI ------------------------------------------------------------------------------------------


def _report_cfg(arg: str | None) -> ReportConfig:
    return get_section(ReportConfig, load_config_arg(arg), "report") if arg else ReportConfig()


def cli_report_data(argv: list[str]) -> int:
    """``indextts report-data``: data summary page and histograms."""
    p = argparse.ArgumentParser(prog="indextts report-data", description=cli_report_data.__doc__)
    p.add_argument("--config", help="config file or inline JSON with a report section")
    for name in ("summary", "clean", "vocab-report", "speakers", "page", "durations", "speakers-plot"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--asr-summary", help="the ASR filter's asr_summary.json, when it ran")
    p.add_argument("--asr-cer", help="where the ASR filter's CER histogram goes (with --asr-summary)")
    a = p.parse_args(argv)
    if bool(a.asr_summary) != bool(a.asr_cer):
        p.error("--asr-summary and --asr-cer go together")
    out = report_data(_report_cfg(a.config), summary=Path(a.summary), clean=Path(a.clean),
                      vocab_report=Path(a.vocab_report), speakers=Path(a.speakers), page=Path(a.page),
                      durations_plot=Path(a.durations), speakers_plot=Path(a.speakers_plot),
                      asr_summary=Path(a.asr_summary) if a.asr_summary else None,
                      asr_cer_plot=Path(a.asr_cer) if a.asr_cer else None)
    print("wrote " + ", ".join(map(str, out)))
    return 0


def cli_report_stage(argv: list[str]) -> int:
    """``indextts report-stage``: one stage's curves and summary (each output when asked for)."""
    p = argparse.ArgumentParser(prog="indextts report-stage", description=cli_report_stage.__doc__)
    p.add_argument("--config", help="config file or inline JSON with a report section")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--metrics", required=True, help="the stage's metrics.jsonl")
    p.add_argument("--meta", required=True, help="the stage's model.json")
    p.add_argument("--transfer", help="stage 1's transfer_report.json, read when it exists (an import of the released gpt.pth)")
    for name in ("losses", "throughput", "summary", "speaker"):
        p.add_argument(f"--{name}", help=f"write the {name} output here")
    a = p.parse_args(argv)
    out = report_stage(_report_cfg(a.config), a.stage, metrics=Path(a.metrics), meta=Path(a.meta),
                       transfer=Path(a.transfer) if a.transfer else None,
                       **{k: Path(getattr(a, k)) if getattr(a, k) else None
                          for k in ("losses", "throughput", "summary", "speaker")})
    print("wrote " + ", ".join(map(str, out)))
    return 0


def cli_report_samples(argv: list[str]) -> int:
    """``indextts report-samples``: the samples page with playable audio."""
    p = argparse.ArgumentParser(prog="indextts report-samples", description=cli_report_samples.__doc__)
    p.add_argument("--tables", nargs="+", required=True, help="results/samples/stageN/samples.tsv, one per stage")
    p.add_argument("--out-dir", required=True, help="the page's folder")
    p.add_argument("--prompt-seconds", type=float, default=6.0, help="synthesize.prompt_seconds")
    p.add_argument("--scores", nargs="*", default=[], help="results/eval/stageN/scores.parquet, one per stage")
    p.add_argument("--topline-dir", help="evaluate-reference's topline/ folder (codec resynthesis of the real recordings)")
    p.add_argument("--config", help="config file or inline JSON with a report section")
    a = p.parse_args(argv)
    tables = _by_stage(p, a.tables, "results/samples/stageN/samples.tsv")
    scores = _by_stage(p, a.scores, "results/eval/stageN/scores.parquet")
    page = report_samples(tables, Path(a.out_dir), prompt_seconds=a.prompt_seconds, scores=scores,
                          topline_dir=Path(a.topline_dir) if a.topline_dir else None, cfg=_report_cfg(a.config))
    print(f"wrote {page}")
    return 0


def _by_stage(p: argparse.ArgumentParser, paths: Sequence[str], example: str) -> dict[int, Path]:
    """stage -> path, the stage read off the parent folder's name (``stageN``)."""
    out = {}
    for t in (t for t in paths if t):  # an empty list reaches a rule's command as one empty argument
        stage = Path(t).parent.name
        if not stage.startswith("stage") or not stage[5:].isdigit():
            p.error(f"{t}: expected {example}")
        out[int(stage[5:])] = Path(t)
    return out


def cli_report_eval(argv: list[str]) -> int:
    """``indextts report-eval``: the evaluation page (every measure per stage, topline, floor, probes) and plot."""
    p = argparse.ArgumentParser(prog="indextts report-eval", description=cli_report_eval.__doc__)
    p.add_argument("--summaries", nargs="*", default=[], help="results/eval/stageN/summary.json, one per stage")
    p.add_argument("--probes", nargs="*", default=[], help="results/eval/stageN/probe.json")
    p.add_argument("--page", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--config", help="config file or inline JSON with a report section")
    a = p.parse_args(argv)
    out = report_eval(_report_cfg(a.config), _by_stage(p, a.summaries, "results/eval/stageN/summary.json"),
                      _by_stage(p, a.probes, "results/eval/stageN/probe.json"), page=Path(a.page), plot=Path(a.plot))
    print("wrote " + ", ".join(map(str, out)))
    return 0


def cli_report_export(argv: list[str]) -> int:
    """``indextts report-export``: the export report as a page."""
    p = argparse.ArgumentParser(prog="indextts report-export", description=cli_report_export.__doc__)
    p.add_argument("--export-report", required=True, help="results/export/export_report.json")
    p.add_argument("--page", required=True)
    a = p.parse_args(argv)
    print(f"wrote {report_export(Path(a.export_report), Path(a.page))}")
    return 0
