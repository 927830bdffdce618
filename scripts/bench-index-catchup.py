#!/usr/bin/env python3
"""How fast the gateway's indexer works off a backlog (docs/benchmarks.md, issue 3).

    scripts/bench-index-catchup.py [BIN_DIR] [EVENTS]

Starts BIN_DIR/rewind (default ~/.cache/rewind-target/release) on a temp data dir with the
rate limit off, sends EVENTS (default 1,000,000) ~1 KiB JSON events over HTTP in batches of
500 on 4 connections as fast as the gateway acks them, then polls /readyz until the search
backend's events_indexed reaches EVENTS. Prints the ingest time, the time until everything
was indexed and the gateway's peak RSS. Python standard library only."""
import sys, os, json, time, subprocess, tempfile, http.client, random, threading
bindir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser('~/.cache/rewind-target/release')
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
port = 18000 + random.randint(0, 999)
d = tempfile.mkdtemp(prefix='catchup-')
p = subprocess.Popen([f'{bindir}/rewind', 'serve', '--listen', f'127.0.0.1:{port}', '--data-dir', d, '--rate-limit-events-per-sec', '0'],
                     stdout=subprocess.DEVNULL, stderr=open(f'{d}.log', 'w'))
def req(method, path, body=None, token=None):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    h = {'Content-Type': 'application/json'}
    if token: h['Authorization'] = 'Bearer ' + token
    c.request(method, path, body=body, headers=h)
    r = c.getresponse(); data = r.read(); c.close()
    return r.status, data
for _ in range(200):
    try:
        if req('GET', '/readyz')[0] in (200, 503): break
    except Exception: time.sleep(0.1)
root = open(f'{d}/root-token').read().strip()
admin = json.loads(req('POST', '/v1/teams', json.dumps({'name': 'acme'}), root)[1])['admin_token']
req('POST', '/v1/collections', json.dumps({'name': 'orders'}), admin)
tok = json.loads(req('POST', '/v1/tokens', json.dumps({'name': 'app', 'scopes': ['ingest', 'read']}), admin)[1])['token']
types = ['login', 'payment_failed', 'purchase', 'refund', 'view', 'cart_add']
def ev(i):
    e = {'type': types[i % 6], 'seq': i, 'event_id': '%032x' % random.getrandbits(128),
         'account': {'id': 'acct_%d' % random.randrange(200000), 'plan': 'pro', 'region': 'eu-west', 'email': 'u%d@example.com' % i},
         'amount': random.randrange(100000) / 100, 'currency': 'EUR',
         'session': {'id': '%012x' % random.getrandbits(48), 'ip': '10.%d.%d.%d' % (random.randrange(256), random.randrange(256), random.randrange(256)), 'ua': 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0'},
         'items': [{'sku': 'SKU-%d' % random.randrange(5000), 'qty': random.randrange(1, 5), 'price': 19.99}],
         'message': 'The quick brown fox jumps over the lazy dog. ' * 9}
    return json.dumps(e)
bodies = []
for b in range(16):
    bodies.append('\n'.join(ev(b * 500 + i) for i in range(500)).encode())
peak = [0]
stop = [False]
def rss():
    while not stop[0]:
        try:
            for l in open(f'/proc/{p.pid}/status'):
                if l.startswith('VmRSS'): peak[0] = max(peak[0], int(l.split()[1]) // 1024)
        except Exception: pass
        time.sleep(0.05)
threading.Thread(target=rss, daemon=True).start()
t0 = time.time()
per = n // 500 // 4
def send(k):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    for j in range(per):
        c.request('POST', '/v1/collections/orders/events', body=bodies[(k * per + j) % 16], headers={'Authorization': 'Bearer ' + tok, 'Content-Type': 'application/x-ndjson'})
        r = c.getresponse(); r.read()
        assert r.status == 202, r.status
ths = [threading.Thread(target=send, args=(k,)) for k in range(4)]
[t.start() for t in ths]; [t.join() for t in ths]
t1 = time.time()
total = per * 4 * 500
deadline = time.time() + 600
while True:
    if time.time() > deadline or p.poll() is not None:
        p.kill()
        sys.exit(f'the index did not reach {total} events within 10 minutes (gateway log: {d}.log)')
    s, body = req('GET', '/readyz')
    j = json.loads(body)
    if j['backends']['search']['events_indexed'] >= total: break
    time.sleep(0.1)
t2 = time.time()
stop[0] = True
print(f'{bindir}: {total} events ingested in {t1-t0:.1f} s; indexed all {t2-t0:.1f} s after the first send ({t2-t1:.1f} s after the last ack): {total/(t2-t0):.0f} events/s indexed; gateway peak RSS {peak[0]} MiB')
p.terminate(); p.wait()
subprocess.run(['rm', '-rf', d, d + '.log'])
