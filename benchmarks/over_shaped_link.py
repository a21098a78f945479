"""Run a torchrun script with its ranks split over the shaped link (as root): half the ranks in
each of two network namespaces joined by a 400 Mbit/s tbf-shaped veth, launched as two
torchrun nodes (`--nnodes=2`) rendezvousing over the veth, so every exchange between the
halves crosses it.

    python benchmarks/over_shaped_link.py --nproc 2 benchmarks/flux_context_parallel.py --out OUT.json

Expected run time: the script's own, plus a second to make and remove the link (about 1 min for
flux_context_parallel.py on a 2-core CPU). The script's own flags go after it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _launch import made, shaped_link
from moedit.runtime.netns import free_port

RUN_TIME = "the script's own plus about a second (flux_context_parallel.py: about 1 min on a 2-core CPU)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks in all, half in each namespace")
    parser.add_argument("--save", action="store_true", help="pass --save on to the script (it writes its own results)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.nproc % 2:
        parser.error(f"--nproc {args.nproc}: the ranks split evenly over two namespaces; give an even number")
    link = shaped_link("shaped", "over_shaped_link.py")
    with made(link, "over_shaped_link.py"):
        port = str(free_port())
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={args.nproc // 2}",
                    f"--master_addr={link.addresses[0]}", f"--master_port={port}"]
        procs = [subprocess.Popen(link.exec(i, [*launcher, f"--node_rank={i}", args.script, *args.args,
                                                    *(["--save"] if args.save else [])]),
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **link.env(i)}) for i in range(2)]
        codes = [proc.wait() for proc in procs]
    print(f"over {link.describe()}: exit codes {codes}")
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
