"""Two nodes for real: 2 ranks in each of two network namespaces (loopback inside one, a
shaped veth between them), launched as `torchrun --nnodes=2` from each namespace with the
rendezvous over the veth and GLOO_SOCKET_IFNAME set, which is the multi-node path a cluster
takes. Lossless plans, laid out across the node boundary or inside nodes, give the
single-device model's images. Needs root and iproute2 (CI runs as root); skipped elsewhere,
saying why.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from moedit.runtime.netns import LinkError, ShapedLink, free_port

PLANS = {
    "experts over both nodes": {"expert_parallel": {"degree": 4}},
    "experts inside a node, data parallel across": {"expert_parallel": {"degree": 2}, "data_parallel": 2},
    "ulysses and experts inside a node, data parallel across": {
        "sequence_parallel": {"ulysses": 2}, "expert_parallel": {"degree": 2}, "data_parallel": 2},
    "ring across nodes, ulysses inside": {"sequence_parallel": {"ulysses": 2, "ring": 2},
                                           "expert_parallel": {"degree": 4}},
    "examples/plans/two_nodes.yaml": yaml.safe_load(
        (pathlib.Path(__file__).parent.parent / "examples" / "plans" / "two_nodes.yaml").read_text()),
}
ARGS = ["--model", "digits", "--steps", "3", "--num-images", "6", "--seed", "3"]


@pytest.fixture(scope="module")
def link():
    problem = ShapedLink.check()
    if problem:
        pytest.skip(problem)
    try:
        with ShapedLink(rate="1gbit") as made:
            yield made
    except LinkError as err:  # root without the capability to make namespaces (a container, say)
        pytest.skip(f"cannot make network namespaces here: {err}")


def _run(commands: list[tuple[list[str], dict]], timeout_s: float = 240) -> None:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands]
    try:
        outputs = [proc.communicate(timeout=timeout_s) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]


def _images(tmp_path, name: str, plan: dict, link=None) -> torch.Tensor:
    out, plan_file = tmp_path / name, tmp_path / f"{name}.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    args = ["-m", "moedit.run", "--plan", str(plan_file), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if link is None:
        _run([([sys.executable, *args], env)])
    else:
        port = str(free_port())
        _run([(link.exec(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                "--nproc_per_node=2", f"--master_addr={link.addresses[0]}", f"--master_port={port}",
                                *args]), {**env, **link.env(node)}) for node in range(2)])
    return torch.load(out / "images.pt")


def test_lossless_plans_across_two_nodes_equal_the_single_device_model(link, tmp_path):
    reference = _images(tmp_path, "single", {"expert_parallel": {"degree": 1}})
    for name, plan in PLANS.items():
        images = _images(tmp_path, "".join(c if c.isalnum() else "_" for c in name), plan, link)
        torch.testing.assert_close(images, reference, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
