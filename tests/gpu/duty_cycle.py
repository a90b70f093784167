#!/usr/bin/env python3
"""Real-hardware check of the agent's busy, allocated and SM-active seconds.

Run by hand on a GPU host, never by CI (nothing in `cargo test` starts it):

    cargo build --release
    python3 tests/gpu/duty_cycle.py [--gpu 0] [--binary target/release/commitmeter]

Needs the NVIDIA driver, Python 3 and PyTorch with CUDA; the GPU should be otherwise
unused. It starts the release agent on the real driver (1 s rounds), then runs a known
load on one GPU, each phase in its own process so that the agent sees a compute process
come and go:

1. `duty`: PyTorch matrix products on a fixed duty cycle, 50 % of every second (0.5 s of
   back-to-back 8192 x 8192 bf16 matmuls, then 0.5 s asleep), for 60 s;
2. `idle`: no process at all, 30 s;
3. `hold`: a process that allocates 1 GiB on the GPU and sleeps 60 s without launching a
   kernel (an allocated-but-idle job).

For each phase it prints the growth of the agent's counters for that GPU beside what the
duty cycle implies, then the agent's CPU time (share of one core) and RSS. Expect busy
about 50 % of observed in `duty` (utilization counts any kernel running, so a little
more), SM-active somewhat below busy (launch gaps, tails), tensor-active below that;
everything 0 in `idle` with allocated 0; allocated = observed and busy, SM-active about 0
in `hold`. Record what it prints in the README's agent section with the driver version.
"""

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request

SERIES = [
    "observed",
    "busy",
    "allocated",
    "allocated_busy",
    "sm_active",
    "tensor_active",
    "allocated_sm_active",
]


def load(kind: str, seconds: float) -> None:
    """The child process: one phase's load on CUDA device 0 (set CUDA_VISIBLE_DEVICES)."""
    import torch

    dev = torch.device("cuda:0")
    if kind == "duty":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            second = time.monotonic()
            while time.monotonic() - second < 0.5:
                for _ in range(4):
                    c = a @ b
                torch.cuda.synchronize()
            del c
            time.sleep(max(0.0, second + 1.0 - time.monotonic()))
    elif kind == "hold":
        held = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        torch.cuda.synchronize()
        time.sleep(seconds)
        del held


def scrape(addr: str, gpu: str) -> dict:
    body = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for name in SERIES:
        pat = rf'^commitmeter_gpu_{name}_seconds_total\{{[^}}]*gpu="{gpu}"[^}}]*\}} (\S+)$'
        m = re.search(pat, body, re.M)
        out[name] = float(m.group(1)) if m else None
    info = re.search(rf'^commitmeter_gpu_info\{{([^}}]*gpu="{gpu}"[^}}]*)\}}', body, re.M)
    out["info"] = info.group(1) if info else ""
    return out


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", default="0", help="NVML index of the GPU to load")
    ap.add_argument("--binary", default="target/release/commitmeter")
    ap.add_argument("--listen", default="127.0.0.1:19473")
    ap.add_argument("--load", choices=["duty", "hold"], help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        load(args.load, args.seconds)
        return

    log_path = f"/tmp/commitmeter-duty-cycle-{os.getpid()}.log"
    agent = subprocess.Popen(
        [args.binary, "agent", f"--web.listen-address={args.listen}", "--sample.interval=1s"],
        stderr=open(log_path, "w"),
    )
    print(f"agent log: {log_path}")
    try:
        for _ in range(100):
            try:
                if urllib.request.urlopen(f"http://{args.listen}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            sys.exit("the agent did not become ready")
        time.sleep(2)
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader", f"--id={args.gpu}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"GPU {args.gpu}: {driver}")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=args.gpu)
        cpu0, wall0 = cpu_seconds(agent.pid), time.monotonic()
        before = scrape(args.listen, args.gpu)
        print(f"commitmeter_gpu_info{{{before['info']}}}")
        phases = [
            ("duty", 60.0, {"busy": 0.5, "allocated": 1.0, "sm_active": 0.5}),
            ("idle", 30.0, {"busy": 0.0, "allocated": 0.0, "sm_active": 0.0}),
            ("hold", 60.0, {"busy": 0.0, "allocated": 1.0, "sm_active": 0.0}),
        ]
        print(f"{'phase':6} " + " ".join(f"{s:>19}" for s in SERIES))
        for kind, seconds, expect in phases:
            if kind == "idle":
                time.sleep(seconds)
            else:
                subprocess.run(
                    [sys.executable, __file__, "--load", kind, f"--seconds={seconds}"],
                    env=env,
                    check=True,
                )
            time.sleep(2)  # two rounds, so the phase's last seconds are counted
            after = scrape(args.listen, args.gpu)
            growth = {
                s: (after[s] - before[s]) if after[s] is not None and before[s] is not None else None
                for s in SERIES
            }
            print(
                f"{kind:6} "
                + " ".join(f"{'absent' if v is None else f'{v:.2f}':>19}" for v in growth.values())
            )
            obs = growth["observed"] or 0.0
            print(
                "  expected about: "
                + ", ".join(f"{k} {v * obs:.1f} s" for k, v in expect.items())
                + f" (of {obs:.1f} s observed; the phase's process start-up and the 2 s after it count too)"
            )
            before = after
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(agent.pid) - cpu0
        print(
            f"agent: CPU {cpu:.2f} s over {wall:.0f} s = {100 * cpu / wall:.3f} % of one core; "
            f"RSS {status_kb(agent.pid, 'VmRSS:')} kB, peak {status_kb(agent.pid, 'VmHWM:')} kB"
        )
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()


if __name__ == "__main__":
    main()
