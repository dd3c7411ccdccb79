import os, sys, time, tempfile
sys.path.insert(0, "/work/main")
from pathlib import Path
from tests.fixtures.llm_endpoint import start_serve_app, stop_endpoint
tck = os.sysconf("SC_CLK_TCK")
def tree_cpu(root_pgid):
    tot = 0.0
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
            if int(f[2]) == root_pgid or int(f[3]) == root_pgid:
                tot += (int(f[11]) + int(f[12])) / tck
        except Exception: pass
    return tot
def all_cpu():
    tot = 0.0
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid(): continue
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
            tot += (int(f[11]) + int(f[12])) / tck
        except Exception: pass
    return tot
ep = start_serve_app(Path(tempfile.mkdtemp()))
print("up", ep.url, flush=True)
time.sleep(10)
c0, t0 = all_cpu(), time.time()
time.sleep(60)
c1, t1 = all_cpu(), time.time()
print(f"idle app: {c1-c0:.1f} CPU-s over {t1-t0:.0f} s = {(c1-c0)/(t1-t0)*100:.1f} % of a core", flush=True)
stop_endpoint(ep)
