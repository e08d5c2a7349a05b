#!/usr/bin/env bash
# Rewrites constraints.txt, the tested dependency set: installs the project unconstrained into a fresh
# virtualenv (the newest releases pyproject.toml allows), runs the tests there, and only if they pass
# freezes that environment. Arguments go to pytest (default: the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install torch==2.13.0 -e '.[dev]'
"$work/venv/bin/pytest" "$@"
{
    echo "# The dependency set the tests passed with (Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())')); install with"
    echo "#   pip install torch==2.13.0 -c constraints.txt -e '.[dev]'"
    echo "# Written by scripts/refresh-constraints.sh; edit pyproject.toml's ranges, not this file."
    # torch without its local label (+cpu, +cu128): the same pin gets the CUDA build where there is one,
    # and the CUDA runtime wheels that build pulls in follow it rather than this file.
    "$work/venv/bin/pip" freeze --exclude-editable \
        | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' \
        | grep -Ev '^(nvidia-|triton==|chroma-agents==)'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
