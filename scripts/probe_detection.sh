#!/bin/bash
# Queries until detection: a fresh replica (action=refuse, memory store) per attack run.
cd "$(dirname "$0")/.."
port=18091
for photo in imagenet_00_243 imagenet_05_853 imagenet_07_* imagenet_10_* imagenet_15_*; do
  f=$(ls testdata/imagenet/$photo*.jpg | head -1)
  for m in square nes; do
    pkill -f "bind 127.0.0.1:$port"; sleep 0.5; port=$((port+1))
    PANDAGUARD_ATTACK_DETECTION__ACTION=refuse PANDAGUARD_SERVER__DRAIN_DELAY_MS=0 ./target/release/pandaguard serve --config config/default.toml --bind 127.0.0.1:$port >/tmp/probe-$port.log 2>&1 &
    for i in $(seq 90); do curl -sf localhost:$port/health/ready >/dev/null && break; sleep 0.5; done
    out=$(timeout 600 ./target/release/pandaguard attack $f --url http://127.0.0.1:$port --method $m --eps 4/255 --queries 1000 --against none --out /tmp/probe-adv.png 2>&1 | tail -1)
    n=$(grep '"/classify"' /tmp/probe-$port.log | awk '/"status":429/{print NR; exit}')
    ok=$(grep '"/classify"' /tmp/probe-$port.log | grep -c '"status":200')
    succ=$(echo "$out" | grep -o '"success":[a-z]*' | head -1)
    echo "$(basename $f) $m: first 429 at query ${n:-none}; 200s $ok; ${succ:-refused: $(echo $out | cut -c1-80)}"
  done
done
pkill -f "bind 127.0.0.1:"
