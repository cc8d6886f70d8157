import json

import pyarrow as pa
import pyarrow.parquet as pq

from indextts.speakers import SpeakersConfig, select_speakers


def test_top_k_with_minimum_and_deterministic_ties(tmp_path):
    speakers = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 1 + ["a"] * 4
    splits = ["train"] * 12 + ["val"] * 4  # val rows do not count
    clean = tmp_path / "clean.parquet"
    pq.write_table(pa.table({"speaker": speakers, "split": splits}), clean)
    doc = select_speakers(SpeakersConfig(top_k=2, min_utterances=2), clean, tmp_path / "speakers.json")
    assert doc["speakers"] == {"a": 0, "b": 1}  # b and c tie at 3: name order decides
    assert doc["stats"] == json.loads((tmp_path / "speakers.json").read_text())["stats"]
    s = doc["stats"]
    assert (s["total_samples"], s["unique_speakers"], s["eligible"], s["selected"]) == (12, 4, 3, 2)
    assert s["share_of_samples_covered"] == round(8 / 12, 6)


def test_base_language_speakers_count_only_when_stage_2_trains_on_them(tmp_path):
    speakers = ["a"] * 4 + ["b"] * 3 + ["en1"] * 6 + ["en2"] * 2
    clean = tmp_path / "clean.parquet"
    pq.write_table(pa.table({"speaker": speakers, "split": ["train"] * len(speakers),
                             "replay": [s.startswith("en") for s in speakers]}), clean)
    cfg = SpeakersConfig(top_k=10, min_utterances=2)
    left_out = select_speakers(cfg, clean, tmp_path / "main.json")
    assert left_out["speakers"] == {"a": 0, "b": 1} and left_out["stats"]["total_samples"] == 7
    assert left_out["stats"]["base_language_speakers"] == "left out"
    counted = select_speakers(cfg, clean, tmp_path / "all.json", replay=True)
    assert counted["speakers"] == {"en1": 0, "a": 1, "b": 2, "en2": 3} and counted["stats"]["total_samples"] == 15
