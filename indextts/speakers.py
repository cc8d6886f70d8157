"""select_speakers: the speakers the stage-2 speaker classifier learns to tell apart.

Stage 2 puts a gradient reversal layer and a speaker classifier on the emotion vector, so the
emotion encoder learns to carry no speaker identity. The classifier needs speakers with enough
utterances to be learnable: the top-K speakers by train utterances, each with at least M.
Base-language (``data.replay``) speakers count only when stage 2 trains on their rows
(``train.stage2.replay_ratio`` > 0); otherwise they would be classes without a single example.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indextts.config import get_section, load_config_arg
from indextts.files import write_json


@dataclass(frozen=True)
class SpeakersConfig:
    """The ``speakers`` config section."""

    top_k: int = 500  # classifier classes; more speakers make the adversary harder to fool
    min_utterances: int = 10  # fewer train utterances than this cannot teach the classifier a speaker


def select_speakers(cfg: SpeakersConfig, clean_parquet: str | Path, out_path: str | Path, *, replay: bool = False) -> dict:
    """Pick the top-K speakers with at least M train utterances and write ``speakers.json``.

    Ties in utterance count are broken by speaker name, so the choice and the class ids are the
    same on every run.

    Args:
        cfg: the ``speakers`` section.
        clean_parquet: the cleaned manifest (its train split counts).
        out_path: where ``speakers.json`` goes: ``{"speakers": {name: class_id}, "stats": {...}}``.
        replay: count the base-language rows (clean.parquet's ``replay`` column) too: stage 2
            trains on them (``train.stage2.replay_ratio`` > 0). Without, they are left out.

    Returns:
        The written document.
    """
    # Both columns read dictionary-encoded (as clean.parquet stores them): the split is compared
    # once per distinct value, not once per row.
    has_replay = "replay" in pq.read_schema(clean_parquet).names
    columns = ["speaker", "split"] + (["replay"] if has_replay else [])
    table = pq.read_table(clean_parquet, columns=columns, read_dictionary=["speaker", "split"])
    is_train = pa.chunked_array([pc.equal(c.dictionary, "train").take(c.indices) for c in table.column("split").chunks], type=pa.bool_())
    if has_replay and not replay:
        is_train = pc.and_(is_train, pc.invert(pc.fill_null(table.column("replay"), False)))
    train = table.filter(is_train)
    counts = pc.value_counts(train.column("speaker"))
    names = counts.field("values").to_pylist()
    freq = counts.field("counts").to_pylist()
    ranked = sorted(zip(names, freq), key=lambda kv: (-kv[1], kv[0]))
    eligible = [(s, n) for s, n in ranked if n >= cfg.min_utterances]
    chosen = eligible[: cfg.top_k]
    covered = sum(n for _, n in chosen)
    stats = {
        "total_samples": train.num_rows,
        "unique_speakers": len(ranked),
        "eligible": len(eligible),
        "selected": len(chosen),
        "share_of_samples_covered": round(covered / train.num_rows, 6) if train.num_rows else 0.0,
        "min_utterances": cfg.min_utterances,
        "top_k": cfg.top_k,
        "base_language_speakers": "counted" if replay else "left out",
        "utterances_of_selected": {"min": chosen[-1][1] if chosen else 0, "max": chosen[0][1] if chosen else 0},
    }
    doc = {"speakers": {s: i for i, (s, _) in enumerate(chosen)}, "stats": stats}
    write_json(out_path, doc)
    return doc


def cli_select_speakers(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="indextts select-speakers", description="Choose the stage-2 classifier speakers.")
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with a speakers section")
    p.add_argument("--clean", required=True, type=Path, help="clean.parquet")
    p.add_argument("--out", required=True, type=Path, help="speakers.json")
    p.add_argument("--replay", action="store_true",
                   help="count base-language (data.replay) speakers too: stage 2 trains on them (stage2.replay_ratio > 0)")
    args = p.parse_args(argv)
    cfg = get_section(SpeakersConfig, load_config_arg(args.config), "speakers")
    doc = select_speakers(cfg, args.clean, args.out, replay=args.replay)
    print("select-speakers: " + json.dumps(doc["stats"]))
    if not doc["speakers"]:
        print(
            f"select-speakers: warning: no speaker has {cfg.min_utterances} train utterances; "
            "stage 2 has no classes (lower speakers.min_utterances)"
        )
    return 0
