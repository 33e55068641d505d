#!/usr/bin/env bash
# The point of MoE, at equal wall time: train the default MoE and the dense model of equal active FFN
# width (every block dense, hidden = expert-hidden x (shared + top-k) = 288) for the same number of
# seconds each, one after the other, single process, same machine, and print both validation curves.
#
#   bench/moe-vs-dense.sh [SECONDS] [DATA] [OUT_DIR] [extra elasticmoe options...]
# Defaults: 240 s each, ../shared/data/tinyshakespeare.txt (the embedded corpus if that is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-240}"
data="${2:-../shared/data/tinyshakespeare.txt}"
out="${3:-$(mktemp -d)}"
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
data_opt=()
if [ -f "$data" ]; then data_opt=(--data "$data"); else echo "no $data: using the embedded corpus" >&2; fi
dotnet build src/ElasticMoE.Cli -c Release -v q -nologo >/dev/null
run() { # name, extra options...
  local name="$1"; shift
  # Steps well past what fits in the time, the same for both, so both follow the same LR schedule.
  dotnet src/ElasticMoE.Cli/bin/Release/net10.0/elasticmoe.dll train --single-process "${data_opt[@]}" \
    --steps 5000 --time-limit "$seconds" --metrics "$out/$name.jsonl" "$@" >"$out/$name.log"
}
run moe "$@"
run dense --set model.dense-layers=4 --set model.dense-hidden=288 "$@"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
curves = {}
for name in ("moe", "dense"):
    t, rows = 0.0, []
    for line in open(f"{out}/{name}.jsonl"):
        r = json.loads(line)
        if "step" not in r: continue
        t += r["seconds"]
        if "val_loss" in r: rows.append((r["step"], t, r["val_loss"]))
    curves[name] = rows
    print(f"{name}: {rows[-1][0]} steps, last val loss {rows[-1][2]:.4f} at {rows[-1][1]:.0f} s of steps")
print(f"\n{'train s':>8} {'moe step':>8} {'moe val':>8} {'dense step':>10} {'dense val':>9}")
def at(rows, s):
    best = None
    for r in rows:
        if r[1] <= s: best = r
    return best
end = max(max(r[1] for r in c) for c in curves.values())
s = 20.0
while s <= end + 20:
    m, d = at(curves["moe"], s), at(curves["dense"], s)
    fmt = lambda r, w: (f"{r[0]:>{w}} {r[2]:>8.4f}" if r else f"{'':>{w}} {'':>8}")
    print(f"{s:>8.0f} {fmt(m, 8)} {fmt(d, 10)}")
    s += 20
PY
echo "metrics and logs in $out"
