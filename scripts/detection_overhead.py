"""What query-attack detection costs a replica (README "Stopping query attacks"):

  .venv/bin/python scripts/detection_overhead.py [REQUESTS] [FLOOD]

1. Latency: two release servers side by side, detection off and `flag` (the same work
   as `refuse` without refusing), `defense=none`, one client at a time, requests
   alternating between the two (the 20 sample photos in turn, each from a client of its
   own, so nothing is detected); p50 and p90 of each and their ratio.
2. Memory: the `flag` server (memory store, `max_clients` 1000) is flooded with FLOOD
   unique random 224x224 images, each from a new client (a new address in
   X-Forwarded-For, the server trusting 127.0.0.1 as a proxy); its resident memory is
   read every FLOOD/10 requests. The store holds at most max_clients x
   max_queries_per_client queries, so the memory must level off.
"""
import glob, io, os, random, statistics, subprocess, sys, time, urllib.request

import numpy as np
from PIL import Image

requests = int(sys.argv[1]) if len(sys.argv) > 1 else 300
flood = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
photos = [open(p, 'rb').read() for p in sorted(glob.glob(os.path.join(root, 'testdata/imagenet/*.jpg')))]


def serve(port, env):
    env = dict(os.environ, PANDAGUARD_SERVER__DRAIN_DELAY_MS='0', PANDAGUARD_LOG='warn', **env)
    process = subprocess.Popen([os.path.join(root, 'target/release/pandaguard'), 'serve', '--bind', f'127.0.0.1:{port}'],
                               cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready')
            return process
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f'port {port} never became ready')


def classify(port, body, client):
    request = urllib.request.Request(f'http://127.0.0.1:{port}/classify?defense=none', data=body,
                                     headers={'Content-Type': 'application/octet-stream', 'X-Forwarded-For': client})
    started = time.perf_counter()
    with urllib.request.urlopen(request) as answer:
        answer.read()
        assert answer.status == 200
    return time.perf_counter() - started


def rss_mib(process):
    for line in open(f'/proc/{process.pid}/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024


detection = {'PANDAGUARD_ATTACK_DETECTION__ACTION': 'flag',
             'PANDAGUARD_ATTACK_DETECTION__TRUSTED_PROXIES': '["127.0.0.1"]'}
off, on = serve(18401, {}), serve(18402, detection)
try:
    times = {18401: [], 18402: []}
    for i in range(requests):
        for port in (18401, 18402) if i % 2 == 0 else (18402, 18401):
            times[port].append(classify(port, photos[i % len(photos)], f'192.0.2.{i % len(photos) + 1}'))
    p50 = {port: statistics.median(t) * 1e3 for port, t in times.items()}
    p90 = {port: statistics.quantiles(t, n=10)[-1] * 1e3 for port, t in times.items()}
    print(f'defense=none, {requests} requests each, alternating: p50 off {p50[18401]:.2f} ms, flag {p50[18402]:.2f} ms '
          f'(ratio {p50[18402] / p50[18401]:.3f}); p90 off {p90[18401]:.2f} ms, flag {p90[18402]:.2f} ms '
          f'(ratio {p90[18402] / p90[18401]:.3f})')

    rng = np.random.default_rng(0)
    readings = [(0, rss_mib(on))]
    for i in range(1, flood + 1):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(out, 'PNG', compress_level=0)
        client = f'10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}'
        classify(18402, out.getvalue(), client)
        if i % max(flood // 10, 1) == 0:
            readings.append((i, rss_mib(on)))
    print('flood of unique images from unique clients, resident MiB after n requests: ' +
          ', '.join(f'{n}: {mib}' for n, mib in readings))
finally:
    off.terminate(); on.terminate()
