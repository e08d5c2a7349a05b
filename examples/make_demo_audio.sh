#!/usr/bin/env bash
# Regenerates the demo WAVs with espeak-ng (a synthetic voice: no real person's identity).
set -euo pipefail
cd "$(dirname "$0")"
VOICE_TEXT="Hello, thanks for calling. I am the demo voice of chroma agents."
espeak-ng -v en-us -s 150 -w voices/demo/reference.wav "$VOICE_TEXT"
echo "$VOICE_TEXT" > voices/demo/transcript.txt
espeak-ng -v en-us -s 160 -w audio/hello.wav "Hi, can you tell me where my order is?"
