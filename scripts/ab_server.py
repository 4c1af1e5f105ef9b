"""A/B of two or more server variants (builds or settings), alternating, same load:
req/s of answered requests per preset and client count, median over rounds
(docs/benchmarks.md, docs/configuration.md).

  python3 scripts/ab_server.py VARIANTS PLAN [ROUNDS]

VARIANTS: JSON {"name": {"bin": "/path/to/pandaguard" (optional), "env": {...}}};
PLAN: JSON [["preset", clients, requests], ...]. Example (small runs on and off):

  python3 scripts/ab_server.py '{"off": {"env": {"PANDAGUARD_RUNTIME__SMALL_RUN_ROWS": "0"}}, "on": {}}' \\
      '[["fast", 1, 60], ["fast", 4, 80], ["default", 1, 6], ["default", 4, 16]]'

Each round starts each variant's server afresh (release binary, shipped config), sends
three warm-up requests per row, then the row's requests from a thread pool; the order of
variants flips every round. The client is Python, so absolute req/s are below the HTTP
bench's: compare variants, not runs.
"""
import concurrent.futures as cf, json, os, socket, statistics, subprocess, sys, time, urllib.request

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
variants, plan = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
body = open(os.path.join(root, 'testdata/imagenet/imagenet_05_853.jpg'), 'rb').read()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def measure(variant):
    port = free_port()
    env = dict(os.environ, PANDAGUARD_SERVER__DRAIN_DELAY_MS='0', PANDAGUARD_LOG='warn', **variant.get('env', {}))
    binary = variant.get('bin', os.path.join(root, 'target/release/pandaguard'))
    server = subprocess.Popen([binary, 'serve', '--bind', f'127.0.0.1:{port}'], env=env, cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready'); break
            except Exception:
                time.sleep(0.3)

        def send(preset):
            request = urllib.request.Request(f'http://127.0.0.1:{port}/classify?defense={preset}', data=body,
                                             headers={'Content-Type': 'image/jpeg'})
            try:
                with urllib.request.urlopen(request) as answer:
                    answer.read(); return 200
            except urllib.error.HTTPError as error:
                return error.code

        result = {}
        for preset, clients, n in plan:
            for _ in range(3):
                send(preset)
            started = time.time()
            with cf.ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(lambda _: send(preset), range(n)))
            result[f'{preset}/c{clients}'] = round(codes.count(200) / (time.time() - started), 2)
        return result
    finally:
        server.terminate(); server.wait()


results = {name: [] for name in variants}
names = list(variants)
for round_index in range(rounds):
    for name in (names if round_index % 2 == 0 else names[::-1]):
        result = measure(variants[name]); results[name].append(result)
        print(name, json.dumps(result), flush=True)
for name, runs in results.items():
    print('median', name, json.dumps({key: statistics.median(r[key] for r in runs) for key in runs[0]}))
