#!/usr/bin/env bash
# Crash consistency, long form: SIGKILL a process that saves checkpoints (three shards, manifest,
# commit) at random instants, N times (default 1000), and after every kill check that the newest
# valid checkpoint is the newest committed one, that it verifies and holds exactly that step's values.
# The test suite runs the same drill 200 times (tests/ElasticMoE.Tests/Checkpointing/CheckpointCrashTests.cs).
#
#   bench/checkpoint-crash-drill.sh [KILLS] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-1000}"
dir="${2:-$(mktemp -d)/run}"
dotnet build src/ElasticMoE.Cli -c Release -v q -nologo >/dev/null
dotnet src/ElasticMoE.Cli/bin/Release/net10.0/elasticmoe.dll checkpoints crash-drill --run-dir "$dir" --kills "$kills"
