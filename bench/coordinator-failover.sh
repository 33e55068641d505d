#!/usr/bin/env bash
# Coordinator fail-over, measured: a coordinator and two `elasticmoe node` processes train the default
# model with --run-dir; the coordinator's process SIGKILLs itself as step 21 starts
# (cluster.fault-injection worker=coordinator). Mode `restart`: the same `train --run-dir` command is
# started again on the same port as soon as the kill is seen; mode `standby`: a stand-by coordinator
# (`train --standby-for`) was joined from the start. Prints the seconds from the kill to step 21 committed
# (the step in flight, the only one redone) and whether the nodes' units were re-attached.
#   bench/coordinator-failover.sh [restart|standby] [reps]
set -euo pipefail
mode=${1:-restart}; reps=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/src/ElasticMoE.Cli/bin/Release/net10.0/elasticmoe.dll
[ -f "$bin" ] || dotnet build "$root/src/ElasticMoE.Cli" -c Release >/dev/null
work=$(mktemp -d /tmp/elasticmoe-failover.XXXXXX)
stamp() { while IFS= read -r l; do echo "$(date +%s.%N) $l"; done; }
common=(--threads 1 --steps 40 --set checkpoint.every=10)
for rep in $(seq 1 "$reps"); do
  d=$work/$rep; mkdir -p "$d"
  p1=$((20000 + RANDOM % 20000)); p2=$((p1 + 1))
  dotnet "$bin" train --nodes 0 --expect-nodes 2 --port $p1 --run-dir "$d/run" "${common[@]}" \
    --set "cluster.fault-injection=step=20,phase=forward,worker=coordinator,action=kill" 2>&1 | stamp > "$d/first.log" &
  seeds=(--seed-node akka.tcp://elasticmoe@127.0.0.1:$p1)
  if [ "$mode" = standby ]; then
    dotnet "$bin" train --nodes 0 --expect-nodes 2 --port $p2 --run-dir "$d/run" --standby-for akka.tcp://elasticmoe@127.0.0.1:$p1 \
      "${common[@]}" 2>&1 | stamp > "$d/second.log" &
    until grep -q "stand-by coordinator is up" "$d/second.log" 2>/dev/null; do sleep 0.2; done
    seeds+=(--seed-node akka.tcp://elasticmoe@127.0.0.1:$p2)
  fi
  dotnet "$bin" node "${seeds[@]}" --threads 1 > "$d/node1.log" 2>&1 &
  dotnet "$bin" node "${seeds[@]}" --threads 1 > "$d/node2.log" 2>&1 &
  until grep -q "killing the coordinator" "$d/first.log" 2>/dev/null; do sleep 0.05; done
  if [ "$mode" = restart ]; then
    dotnet "$bin" train --nodes 0 --expect-nodes 2 --port $p1 --run-dir "$d/run" "${common[@]}" 2>&1 | stamp > "$d/second.log" &
  fi
  wait
  kill_t=$(grep "killing the coordinator" "$d/first.log" | cut -d' ' -f1)
  next_t=$(grep "step    21/" "$d/second.log" | cut -d' ' -f1)
  adopted=$(grep -c "re-attached" "$d/second.log" || true)
  echo "$mode round $rep: kill -> step 21 committed $(echo "$next_t - $kill_t" | bc) s, re-attached: $([ "$adopted" -gt 0 ] && echo yes || echo no)"
done
echo "logs: $work"
