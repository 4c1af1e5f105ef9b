"""Resident memory and a rough req/s of the release server under a short mixed load
(docs/benchmarks.md "Memory"); settings as environment overrides:

  python3 scripts/memory_probe.py PORT [PANDAGUARD_ENGINE__MAX_BATCH_ROWS=16 ...]

PROBE_BIN picks the server binary (default target/release/pandaguard), to compare builds.

Prints VmRSS after start-up (warm-up included), VmHWM (peak) and VmRSS at the end, and
req/s per phase: `default` at 4 and 16 clients, `none` at 4. Run variants one after the
other, alternating, and compare within one run: req/s here is noisy.
"""
import concurrent.futures as cf, json, os, subprocess, sys, time, urllib.request

port = int(sys.argv[1]); overrides = dict(a.split('=', 1) for a in sys.argv[2:])
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
env = dict(os.environ, PANDAGUARD_SERVER__DRAIN_DELAY_MS='0', PANDAGUARD_LOG='warn', **overrides)
binary = os.environ.get('PROBE_BIN', os.path.join(root, 'target/release/pandaguard'))
server = subprocess.Popen([binary, 'serve', '--bind', f'127.0.0.1:{port}'],
                          env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status(key):
    for line in open(f'/proc/{server.pid}/status'):
        if line.startswith(key):
            return int(line.split()[1]) // 1024


for _ in range(600):
    try:
        urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready'); break
    except Exception:
        time.sleep(0.5)
ready = status('VmRSS')
body = open(os.path.join(root, 'testdata/imagenet/imagenet_03_990.jpg'), 'rb').read()


def send(preset):
    request = urllib.request.Request(f'http://127.0.0.1:{port}/classify?defense={preset}', data=body,
                                     headers={'Content-Type': 'image/jpeg'})
    try:
        with urllib.request.urlopen(request) as answer:
            answer.read(); return answer.status
    except urllib.error.HTTPError as error:
        return error.code


phases = {}
for preset, n, clients in [('default', 24, 4), ('default', 32, 16), ('none', 100, 4)]:
    started = time.time()
    with cf.ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(lambda _: send(preset), range(n)))
    phases[f'{preset}/c{clients}'] = {'req_s': round(n / (time.time() - started), 1),
                                      'statuses': {c: codes.count(c) for c in sorted(set(codes))}}
print(json.dumps({'binary': binary, 'settings': overrides, 'rss_after_start_mib': ready, 'peak_mib': status('VmHWM'),
                  'rss_end_mib': status('VmRSS'), 'phases': phases}))
server.terminate(); server.wait()
