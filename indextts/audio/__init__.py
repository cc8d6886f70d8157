"""The audio models around the GPT, one module per model, none of them reading pipeline config.

- ``dac``: the DAC acoustic codec (encode to codes, decode to a waveform);
- ``w2v_bert``: w2v-BERT 2.0 features (layer 17, normalised with the released statistics);
- ``semantic_codec``: MaskGCT's RepCodec, w2v-BERT features to semantic codes and back to embeddings;
- ``s2mel``: IndexTTS2's semantic-to-mel model (``gpt_layer``, length regulator, flow-matching DiT);
- ``campplus``: the CAM++ speaker model that gives s2mel its style vector;
- ``bigvgan``: the BigVGAN v2 vocoder, mel to waveform.

Extraction (``indextts.codes``) and synthesis (``indextts.synthesize``) sit above this package; nothing
here imports them.
"""
