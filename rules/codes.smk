# Codec codes: extract_codes (one job per shard) and index_codes (gather). Issue 3.
