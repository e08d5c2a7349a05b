"""Cloned voices: a folder per voice (voice.yaml with its consent record, and the reference
recording), checked when added or loaded (`validate`), kept in a library folder (`library`), with
the recording's codec codes stored beside it per model (`codes`)."""
