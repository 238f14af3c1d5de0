#!/bin/sh
# The device command: sh benchmarks/gpu_check.sh  (carry benchmarks/gpu_wheels, filled first here with
# python benchmarks/gpu_check.py --prepare-wheels; docs/scale.md, "GPU check")
cd "$(dirname "$0")/.." && PYTHONUNBUFFERED=1 PYTHONPATH=".:plugins:cli${PYTHONPATH:+:$PYTHONPATH}" exec python3 benchmarks/gpu_check.py "$@"
