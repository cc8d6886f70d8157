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
