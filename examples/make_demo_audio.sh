#!/usr/bin/env bash
# Regenerates the demo audio with espeak-ng (synthetic speech: no real person's identity): the
# caller's line in audio/, and the example voices in voices/ (see voices/make_voices.sh).
set -euo pipefail
cd "$(dirname "$0")"
espeak-ng -v en-us -s 160 -w audio/hello.wav "Hi, can you tell me where my order is?"
voices/make_voices.sh
