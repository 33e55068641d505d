#!/bin/bash
# Chaos run of elastic recovery (a benchmark, not CI: a few minutes): coordinator + 4 `elasticmoe node`
# processes, 20 random SIGKILL-and-restart events over 300 steps; checks exit 0, the curve against a
# fault-free run (1e-4 relative), one node-lost line with its recovery time per kill, no hang.
#   bench/chaos.sh [--events N] [--steps N] [--logs DIR] [--set key=value ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/src/ElasticMoE.Cli/bin/Release/net10.0/elasticmoe.dll
[[ -n ${NO_BUILD:-} ]] || nice -n 5 dotnet build "$root/src/ElasticMoE.Cli" -c Release -v q -nologo
[[ -f $bin ]] || { echo "build failed" >&2; exit 1; }
# The bench bounds itself (20 min overall, 60 s without a committed step); this is the outer guard.
exec timeout -k 10 1500 nice -n 5 dotnet "$bin" bench --suite chaos "$@"
