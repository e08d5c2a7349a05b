"""The model's audio clock, in a module that imports nothing (config.py, which re-exports these, pulls in
transformers), so the agent file, the records and voice checks can count in the model's frames cheaply."""

SAMPLE_RATE = 24_000  # the codec's (and the agent's output) rate
LISTEN_RATE = 16_000  # the thinker's feature extractor rate
FRAME_SECONDS = 0.08  # one audio frame: 1920 samples at 24 kHz, the codec's frame
