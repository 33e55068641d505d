#!/usr/bin/env bash
# Starts a coordinator and N worker nodes as separate OS processes on this machine (loopback only),
# trains, and stops them. Usage: deploy/local-cluster.sh [NODES] [extra elasticmoe args...]
# Example: deploy/local-cluster.sh 2 --steps 200 --data ../shared/data/tinyshakespeare.txt
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${1:-2}"; shift || true
port="${ELASTICMOE_PORT:-4053}"
cores=$(nproc)
# Split the cores between the nodes so they do not oversubscribe one another.
threads=$(( cores / nodes > 0 ? cores / nodes : 1 ))

dotnet build src/ElasticMoE.Cli -c Release -v quiet -nologo >/dev/null
bin=src/ElasticMoE.Cli/bin/Release/net10.0/elasticmoe.dll
logs=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

dotnet "$bin" train --nodes 0 --expect-nodes "$nodes" --port "$port" --threads "$threads" "$@" &
coordinator=$!
for i in $(seq 1 "$nodes"); do
  dotnet "$bin" node --seed-node "akka.tcp://elasticmoe@127.0.0.1:$port" --threads "$threads" "$@" > "$logs/node-$i.log" 2>&1 &
  pids+=($!)
done
wait "$coordinator"
echo "node logs: $logs"
