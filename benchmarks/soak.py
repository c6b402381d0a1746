"""Long-run soak: does a CPU run of the tiny model hold its memory, file handles and /dev/shm, and leave
nothing behind?

Runs `rlhf-ray train` (RL stage only, builtin:tiny, a function reward, checkpoints every `--save-every`
steps) as a subprocess and samples, after every logged step, each process of the run (the driver and
every Ray actor by role, plus Ray's own daemons): RSS, open file handles, threads; and the files the run
added to /dev/shm. After the run it checks that no process of the run and no /dev/shm file it made is
left. Prints the curves (first/last/max per role, growth per 100 steps after warm-up) and writes JSON.

    python benchmarks/soak.py --steps 60 --save-every 20 --out runs/soak60
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def tree(pid: int) -> list[int]:
    kids, out, todo = children_map(), [pid], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def role_of(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        argv0 = open(f"/proc/{pid}/cmdline").read().split("\0")[0]
    except OSError:
        return "gone"
    m = re.match(r"ray::(\w+)", argv0)
    if m:
        return "ray-idle-worker" if m.group(1) == "IDLE" else m.group(1)
    name = os.path.basename(argv0.split()[0]) if argv0 else "?"
    return f"ray-system:{name}" if any(k in argv0 for k in ("ray", "gcs", "plasma")) else f"other:{name}"


def sample(pid: int) -> dict | None:
    try:
        status = open(f"/proc/{pid}/status").read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024 if "VmRSS" in status else 0.0
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mb": rss, "fds": fds, "threads": threads}


def start_time(pid: int) -> str | None:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def shm_used_by(pids: list[int]) -> set[str]:
    """/dev/shm files the processes have open or mapped (the machine is shared: others' files are not ours)."""
    names = set()
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/maps"):
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    names.add(target[len("/dev/shm/"):].split()[0])
        except OSError:
            continue
    return names


def shm_size(names: set[str]) -> tuple[int, float]:
    """How many of `names` exist in /dev/shm now, and their size in MB."""
    n, size = 0, 0
    for f in names:
        try:
            size += os.stat(os.path.join("/dev/shm", f)).st_size
            n += 1
        except OSError:
            pass
    return n, size / 2 ** 20


def steps_logged(out: Path) -> int:
    f = out / "rl" / "metrics.jsonl"
    return sum(1 for x in f.read_text().splitlines() if x.strip()) if f.exists() else 0


def growth_per_100(points: list[tuple[int, float]], warmup: int) -> float:
    """Least-squares slope of value over step after `warmup` steps, per 100 steps."""
    pts = [(s, v) for s, v in points if s > warmup]
    if len(pts) < 3:
        return float("nan")
    n = len(pts)
    ms, mv = sum(s for s, _ in pts) / n, sum(v for _, v in pts) / n
    var = sum((s - ms) ** 2 for s, _ in pts)
    return 100 * sum((s - ms) * (v - mv) for s, v in pts) / var if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps before growth is measured")
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--rss-bound-mb", type=float, default=50.0, help="allowed RSS growth per role over the run")
    ap.add_argument("extra", nargs="*", help="more config overrides")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    ours: set[str] = set()  # every /dev/shm file a process of the run ever had open or mapped
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "train", "configs/quickstart.yaml", f"run.output_dir={out}",
           "run.stages=[rl]", "rl.init_from=builtin:tiny", f"rl.steps={a.steps}", f"rl.save_every={a.save_every}",
           "rl.sample_every=0", "logging.report=false", "logging.console=false",
           "reward.sources=[{kind: function, path: 'rlhf_ray.data.builtin_reviews:vader_reward'}]", *a.extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[int, tuple[str, str]] = {}  # pid -> (role, start time): to find leftovers afterwards
    samples, last = [], 0
    while proc.poll() is None:
        step = steps_logged(out)
        if step > last:
            last = step
            row: dict = {"step": step, "t_s": round(time.time() - t0, 1), "roles": {}}
            pids = tree(proc.pid)
            now = shm_used_by(pids)
            ours |= now
            row["shm_files"], row["shm_mb"] = shm_size(now)
            for pid in pids:
                role, s = role_of(pid, proc.pid), sample(pid)
                if s is None or role == "gone":
                    continue
                seen.setdefault(pid, (role, start_time(pid)))
                agg = row["roles"].setdefault(role, {"rss_mb": 0.0, "fds": 0, "threads": 0, "procs": 0})
                for k in ("rss_mb", "fds", "threads"):
                    agg[k] += s[k]
                agg["procs"] += 1
            samples.append(row)
        time.sleep(0.25)
    err = proc.stderr.read()
    time.sleep(3)  # give Ray's daemons their moment to exit
    leftovers = [{"pid": p, "role": r} for p, (r, st) in seen.items() if st is not None and start_time(p) == st]
    shm_left = sorted(f for f in ours if os.path.exists(os.path.join("/dev/shm", f)))
    report = summarize(samples, a.warmup, a.rss_bound_mb)
    result = {"steps": a.steps, "save_every": a.save_every, "returncode": proc.returncode, "wall_s": time.time() - t0,
              "leftover_processes": leftovers, "leftover_shm_files": shm_left, "summary": report,
              "samples": samples, "stderr_tail": err[-2000:]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    print_report(result)
    ok = proc.returncode == 0 and not leftovers and all(r["within_bound"] for r in report.values())
    return 0 if ok else 1


def summarize(samples: list[dict], warmup: int, bound: float) -> dict:
    roles = sorted({r for s in samples for r in s["roles"]})
    out = {}
    for role in roles:
        pts = [(s["step"], s["roles"][role]) for s in samples if role in s["roles"]]
        rss = [(st, v["rss_mb"]) for st, v in pts]
        fds = [(st, v["fds"]) for st, v in pts]
        after = [v for st, v in rss if st > warmup] or [v for _, v in rss]
        out[role] = {"rss_first_mb": rss[0][1], "rss_after_warmup_mb": after[0], "rss_last_mb": rss[-1][1],
                     "rss_max_mb": max(v for _, v in rss), "rss_growth_mb_per_100_steps": growth_per_100(rss, warmup),
                     "fds_first": fds[0][1], "fds_last": fds[-1][1], "fds_max": max(v for _, v in fds),
                     "within_bound": after[-1] - after[0] <= bound}
    shm = [s["shm_mb"] for s in samples]
    out["/dev/shm (MB)"] = {"rss_first_mb": shm[0] if shm else 0, "rss_last_mb": shm[-1] if shm else 0,
                       "rss_max_mb": max(shm) if shm else 0, "within_bound": True,
                       "files_last": samples[-1]["shm_files"] if samples else 0}
    return out


def print_report(r: dict) -> None:
    print(f"soak: {r['steps']} steps, checkpoint every {r['save_every']}, exit {r['returncode']}, "
          f"{r['wall_s']:.0f} s")
    print(f"{'role':34s} {'rss first':>9s} {'warm':>7s} {'last':>7s} {'max':>7s} {'MB/100st':>9s} "
          f"{'fds first':>9s} {'last':>5s} {'max':>5s}")
    for role, s in r["summary"].items():
        print(f"{role:34s} {s['rss_first_mb']:9.1f} {s.get('rss_after_warmup_mb', s['rss_first_mb']):7.1f} {s['rss_last_mb']:7.1f} "
              f"{s['rss_max_mb']:7.1f} {s.get('rss_growth_mb_per_100_steps', 0):9.2f} "
              f"{s.get('fds_first', s.get('files_last', 0)):9} {s.get('fds_last', ''):5} {s.get('fds_max', ''):5}")
    print("RSS curve (MB, every ~10% of the run):")
    samples = r["samples"]
    picks = samples[:: max(1, len(samples) // 10)] + samples[-1:]
    for role in r["summary"]:
        if role.startswith("/dev/shm"):
            continue
        pts = " ".join(f"{s['step']}:{s['roles'][role]['rss_mb']:.0f}" for s in picks if role in s["roles"])
        print(f"  {role:32s} {pts}")
    print(f"leftover processes: {r['leftover_processes'] or 'none'}; leftover /dev/shm files: "
          f"{r['leftover_shm_files'] or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
