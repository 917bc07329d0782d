#!/usr/bin/env bash
# The CUDA check: on a machine with one GPU and no network, run the CUDA tests, a tiny
# training in each precision with a resume, 30 timed updates of make bench's model and the
# decoding benchmark, and print one report (also written to $REPORT). At most 570 s from the
# start of this script (--budget SECONDS): a step still running then is stopped and reported
# as failed, and the steps after it are not run.
#
# What the machine needs beside a CUDA build of PyTorch (>= 2.4): the Python packages of
# pyproject.toml. Those it lacks can travel as wheels in .whl/ (scripts/gpu_wheels.sh
# downloads them where there is a network); they are installed into /tmp/site. Multi30k
# must be in data/raw/multi30k (make data), and make train's final.pt in runs/ is decoded
# when present (else the tiny model is).
#
#   scripts/gpu_check.sh                 # report in gpu_report.md
#   REPORT=$OUT/gpu_report.md scripts/gpu_check.sh
#   scripts/gpu_check.sh --device cpu --quick   # the parts that need no GPU
set -euo pipefail
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}  # --budget counts from here
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py --out "${REPORT:-gpu_report.md}" "$@"
