"""Benign traffic against a replica with query-attack detection on (README "Stopping
query attacks"). Clients are told apart by API keys, so start the server with them:

  keys=$(python3 -c "import glob; f=sorted(glob.glob('testdata/imagenet/*.jpg')); print('[' + ','.join(['client-%02d' % i for i in range(20)] + ['client-own-' + p[-10:-4] for p in f[:5]] + ['client-retry', 'client-distinct']) + ']')")
  PANDAGUARD_ATTACK_DETECTION__ACTION=refuse PANDAGUARD_SERVER__API_KEYS="$keys" \
      target/release/pandaguard serve --bind 127.0.0.1:18120 &
  .venv/bin/python scripts/benign_traffic.py 18120 many|retry|own|distinct [QUERIES] [SEED]

many: 20 clients, each its photo then QUERIES-1 realistic variants (case b; default 10
queries per client); retry: one client re-sending the same bytes 200 times (c); own: one
client sending variants of its own photo until refused (d); distinct: one client sending
the 20 photos and their mirror images (a). SEED (default 1) seeds the variants: the
thresholds were chosen on variants made with seed 0, so the figures use others.
"""
import io, random, sys, glob, json, urllib.request
from PIL import Image, ImageEnhance, ImageOps
port = int(sys.argv[1]); mode = sys.argv[2]
queries = int(sys.argv[3]) if len(sys.argv) > 3 else 10
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
photos = sorted(glob.glob('testdata/imagenet/*.jpg'))
rng = random.Random(seed)
def variant(img):
    w, h = img.size
    kind = rng.choice(['jpeg', 'resize', 'crop', 'flip', 'bright', 'shift'])
    if kind == 'resize':
        s = rng.uniform(0.8, 1.2); img = img.resize((int(w*s), int(h*s)))
    elif kind == 'crop':
        f = rng.uniform(0.05, 0.20); dx, dy = int(w*f*rng.random()), int(h*f*rng.random())
        img = img.crop((dx, dy, dx + int(w*(1-f)), dy + int(h*(1-f))))
    elif kind == 'shift':
        f = rng.uniform(0.05, 0.20); dx = int(w*f)
        img = img.crop((dx, 0, w, h)) if rng.random() < .5 else img.crop((0, 0, w-dx, h))
    elif kind == 'flip':
        img = ImageOps.mirror(img)
    elif kind == 'bright':
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    out = io.BytesIO(); img.save(out, 'JPEG', quality=rng.randint(70, 95)); return out.getvalue(), kind
def send(body, key=None):
    req = urllib.request.Request(f'http://127.0.0.1:{port}/classify?defense=none', data=body, headers={'Content-Type': 'image/jpeg'})
    if key: req.add_header('Authorization', 'Bearer ' + key)
    try:
        with urllib.request.urlopen(req) as r: return r.status
    except urllib.error.HTTPError as e: return e.code
if mode == 'own':   # (d) one client, variants of its own photo, until refused
    for p in photos[:5]:
        img = Image.open(p).convert('RGB'); n = None
        for i in range(1, 101):
            body, kind = variant(img)
            if send(body, key=f'client-own-{p[-10:-4]}') == 429: n = (i, kind); break
        print(f'(d) {p.split("/")[-1]}: first 429 at variant {n}')
elif mode == 'many':  # (b) 20 clients, each its photo then queries-1 variants
    total = fp = 0; clients = set()
    for k, p in enumerate(photos):
        img = Image.open(p).convert('RGB'); key = f'client-{k:02d}'
        bodies = [open(p, 'rb').read()] + [variant(img)[0] for _ in range(queries - 1)]
        for b in bodies:
            total += 1
            if send(b, key) == 429: fp += 1; clients.add(key)
    print(f'(b) {len(photos)} clients x {queries} queries (seed {seed}): {fp} refused of {total} '
          f'({1000 * fp / total:.1f} per 1000), {len(clients)} clients refused')
elif mode == 'distinct':  # (a) one client, 20 photos and their mirror images
    bodies = []
    for p in photos:
        img = Image.open(p).convert('RGB'); bodies.append(open(p, 'rb').read())
    for p in photos:
        out = io.BytesIO(); ImageOps.mirror(Image.open(p).convert('RGB')).save(out, 'JPEG', quality=90)
        bodies.append(out.getvalue())
    codes = [send(b, 'client-distinct') for b in bodies]
    print(f'(a) one client, {len(bodies)} distinct images: {codes.count(429)} refused')
elif mode == 'retry':  # (c) exact retries
    body = open(photos[3], 'rb').read(); codes = [send(body, 'client-retry') for _ in range(200)]
    print(f'(c) 200 exact retries: {codes.count(429)} refused')
