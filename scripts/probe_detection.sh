#!/bin/bash
# Query attacks against a server with stateful detection (action = refuse), over HTTP,
# as README "Stopping query attacks" reports them:
#
#   scripts/probe_detection.sh single   one replica, memory store
#   scripts/probe_detection.sh lb       redis-server + 3 replicas sharing it + nginx in
#                                       front (config/deploy/nginx.conf), round-robin
#
# Each run is `pandaguard attack PHOTO --url ... --against none --eps 4/255 --queries
# 1000` with fresh API keys (a new client each time, so no run inherits another's
# window or cooldown): Square, NES and HopSkipJump from one key on 5 photos, then the
# adaptive attacker (--adaptive: noise that grows after each refusal, 5 keys rotated)
# with Square and HopSkipJump on 3 photos. One JSON line per run goes to
# target/probe/<mode>.jsonl, and a summary is printed. PROBE_QUICK=1: one photo, no
# adaptive runs. Needs the release binary
# (`make build`) and, for `lb`, nginx and redis-server (`make nginx redis`).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-single}
out=target/probe; mkdir -p "$out"; scratch=$(mktemp -d)
results="$out/$mode.jsonl"; : > "$results"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$scratch"; }
trap cleanup EXIT

python3 -c "print('\n'.join(f'probe-key-{i:03d}' for i in range(400)))" > "$scratch/keys"
serve() {  # port, extra env...
  local port=$1; shift
  env PANDAGUARD_ATTACK_DETECTION__ACTION=refuse PANDAGUARD_ATTACK_DETECTION__SECRET=probe-detection-secret \
    PANDAGUARD_API_KEYS_FILE="$scratch/keys" PANDAGUARD_SERVER__DRAIN_DELAY_MS=0 "$@" \
    target/release/pandaguard serve --bind "127.0.0.1:$port" > "$scratch/replica-$port.log" 2>&1 &
  pids+=($!)
}
wait_ready() { for _ in $(seq 600); do curl -sf "localhost:$1/health/ready" >/dev/null && return; sleep 0.5; done; echo "port $1 never ready"; exit 1; }

if [ "$mode" = single ]; then
  serve 18301; wait_ready 18301; url=http://127.0.0.1:18301
else
  redis=$(command -v redis-server || echo /usr/bin/redis-server)
  "$redis" --port 18399 --save '' --appendonly no --dir "$scratch" > "$scratch/redis.log" 2>&1 & pids+=($!)
  for port in 18311 18312 18313; do
    serve $port PANDAGUARD_ATTACK_DETECTION__STORE=redis://127.0.0.1:18399 \
      'PANDAGUARD_ATTACK_DETECTION__TRUSTED_PROXIES=["127.0.0.1"]'
  done
  for port in 18311 18312 18313; do wait_ready $port; done
  # As tests/load_balancer.rs does: the deploy file with local addresses and every file
  # nginx writes inside the scratch folder.
  temp=""; for kind in client_body proxy fastcgi uwsgi scgi; do
    mkdir -p "$scratch/${kind}_temp"; chmod 777 "$scratch/${kind}_temp"; temp+="    ${kind}_temp_path $scratch/${kind}_temp;\n"; done
  chmod 755 "$scratch"
  sed -e 's/server pandaguard-1:8080/server 127.0.0.1:18311/; s/server pandaguard-2:8080/server 127.0.0.1:18312/' \
      -e 's/server pandaguard-3:8080/server 127.0.0.1:18313/; s/listen 8080;/listen 127.0.0.1:18310;/' \
      -e "s|/var/log/nginx/access.log|$scratch/access.log|; s/worker_processes auto;/worker_processes 1;/" \
      -e "s|^http {\$|http {\n$temp|" config/deploy/nginx.conf > "$scratch/nginx.conf"
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  "$nginx" -p "$scratch" -e "$scratch/nginx-error.log" -c "$scratch/nginx.conf" \
    -g "daemon off; pid $scratch/nginx.pid; error_log $scratch/nginx-error.log warn;" & pids+=($!)
  sleep 1; url=http://127.0.0.1:18310
fi

key=0
next_keys() {  # sets $keys to the next N unused keys (no subshell: the counter must advance)
  keys=""; for _ in $(seq "$1"); do keys+="${keys:+,}probe-key-$(printf %03d $key)"; key=$((key + 1)); done
}
attack() {  # photo, method, keys, extra args...
  local photo=$1 method=$2 keys=$3; shift 3
  local line
  line=$(target/release/pandaguard attack "$photo" --url "$url" --against none --method "$method" --eps 4/255 \
      --queries 1000 --api-keys "$keys" --out "$scratch/adv.png" "$@" 2>/dev/null | tail -1) || true
  [ -n "$line" ] || line='{"failed":true}'
  echo "{\"photo\":\"$(basename "$photo")\",\"run\":\"$method${*:+ adaptive}\",\"report\":$line}" | tee -a "$results" | cut -c1-160
}
photos=(testdata/imagenet/imagenet_00_*.jpg testdata/imagenet/imagenet_05_*.jpg testdata/imagenet/imagenet_07_*.jpg
        testdata/imagenet/imagenet_10_*.jpg testdata/imagenet/imagenet_15_*.jpg)
[ -n "${PROBE_QUICK:-}" ] && photos=("${photos[0]}")
for photo in "${photos[@]}"; do
  for method in square nes hsja; do next_keys 1; attack "$photo" $method "$keys"; done
done
[ -n "${PROBE_QUICK:-}" ] || for photo in "${photos[@]:0:3}"; do
  for method in square hsja; do next_keys 5; attack "$photo" $method "$keys" --adaptive --max-wait 70; done
done
# Who answered: /classify requests in each replica's access log.
for log in "$scratch"/replica-*.log; do
  echo "$(basename "$log" .log): $(grep -c '"path":"/classify"' "$log") /classify requests answered"
done

python3 - "$results" "$mode" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]}: queries until the first 429, per attack (success = fooled raw Lite0 within 4/255)")
for run in sorted({r["run"] for r in rows}):
    rs = [r["report"] for r in rows if r["run"] == run]
    firsts = [r.get("queries_until_first_refusal") for r in rs]
    seen = [f for f in firsts if f is not None]
    won_first = sum(1 for r, f in zip(rs, firsts) if r.get("success") and f is None)
    print(f"  {run:16} runs {len(rs)}, refused {len(seen)}/{len(rs)}, first 429 at median "
          f"{statistics.median(seen) if seen else '-'} max {max(seen) if seen else '-'}, "
          f"refusals {[r.get('refusals') for r in rs]}, sent {[r.get('queries_sent') for r in rs]}, "
          f"success {sum(bool(r.get('success')) for r in rs)}/{len(rs)} (without any refusal: {won_first})")
EOF
