#!/usr/bin/env bash
# Makes the example voices with espeak-ng, so that they carry no real person's identity, and adds
# them to this folder as a voice library through `chroma-agent voice add` (checked, trimmed,
# normalised to 24 kHz mono). Their consent records say they are synthetic.
#
#   examples/voices/make_voices.sh              # every example voice
#   examples/voices/make_voices.sh specialist   # only the named ones
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

declare -A ESPEAK_VOICE=([demo]=en-us [specialist]=en-gb)
declare -A TEXT=(
  [demo]="Hello, thanks for calling. I am the demo voice of chroma agents."
  [specialist]="Good afternoon, you are through to billing. I can help with invoices, payments and refunds."
)

for name in "${@:-demo specialist}"; do
  for one in $name; do
    espeak-ng -v "${ESPEAK_VOICE[$one]}" -s 150 -w "$work/$one.wav" "${TEXT[$one]}"
    "$PYTHON" -m agent.cli voice add "$one" --library examples/voices --replace --synthetic \
      --audio "$work/$one.wav" --transcript "${TEXT[$one]}" \
      --consent-by "no one: a synthetic voice made with espeak-ng (${ESPEAK_VOICE[$one]}), no real person's" \
      --consent-use "examples, demos, tests and benchmarks of chroma-agents" --consent-date 2026-11-22
  done
done
