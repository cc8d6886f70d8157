"""The evaluation stage: scores for synthesized speech against the val set's real recordings.

One concern per module: ``acoustic`` (reference measures that need only audio: MCD-DTW, log-F0
RMSE, voicing error, text retrieval), ``stats`` (bootstrap summaries), and beside them ASR
(CER/WER), speaker similarity, the linear probes and the scoring driver that runs them per stage
and writes the report. Submodules are imported where they are used, not here, so that importing
one measure never loads the models of another.
"""
