"""Train the shipped `digits` DiT-MoE and the classifier its quality metrics use, on CPU.

    python examples/train_digits.py [--minutes 18] [--out models/checkpoints]

The DiT-MoE (config `PRETRAINED["digits"]` in models/pretrained.py: 6 blocks, each MoE
with 8 SwiGLU experts, top-2, plus a shared expert) learns rectified flow on the train
split of scikit-learn's digits at 16x16: z_t = (1 - t) x + t noise, target v = noise - x,
t drawn logit-normal, labels dropped 10 % of the time for classifier-free guidance, a
small load-balancing loss on the gates, AdamW, an EMA of the weights (which is what is
saved, in float16). The classifier (moedit.metrics.DigitsClassifier) trains on the same
train split; its accuracy is reported on the held-out test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from moedit.metrics import DigitsClassifier, accuracy
from moedit.models import digits_dataset, initial_noise, rectified_flow_sample
from moedit.models.dit_moe import DiTMoE, DiTMoEConfig
from moedit.models.pretrained import PRETRAINED, SAMPLING


def shift(images: torch.Tensor, max_pixels: int = 1) -> torch.Tensor:
    """Random translation by up to `max_pixels` (the border is background, so rolling is safe)."""
    dx, dy = torch.randint(-max_pixels, max_pixels + 1, (2,)).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def balance_loss(model: DiTMoE, captured: list) -> torch.Tensor:
    """Switch-Transformer load balancing: E * sum_e (share of slots to e) * (mean gate prob of e)."""
    losses = []
    for tokens, expert_ids, gate in captured:
        probs = F.linear(tokens, gate.weight).softmax(-1)
        share = torch.bincount(expert_ids.reshape(-1), minlength=probs.shape[-1]).float() / expert_ids.numel()
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_dit(images, labels, minutes: float, batch: int = 64, log_every: int = 200) -> tuple[DiTMoE, dict]:
    torch.manual_seed(0)
    model = DiTMoE(DiTMoEConfig(**PRETRAINED["digits"])).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    captured = []
    for block in model.blocks:
        gate = block.moe.gate
        gate.register_forward_hook(lambda m, inp, out: captured.append((inp[0], out[0], m)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    budget, start, step, losses = minutes * 60, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        lr = 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (batch,))
        x, y = shift(images[idx]), labels[idx]
        noise = torch.randn_like(x)
        t = torch.sigmoid(torch.randn(x.shape[0]))
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        captured.clear()
        v = model(z, t, y)
        loss = F.mse_loss(v, noise - x)
        total = loss + 0.01 * balance_loss(model, captured)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step:6d}  {elapsed / 60:5.1f} min  loss {recent:.4f}  lr {lr:.2e}", flush=True)
    record = {"steps": step, "train_minutes": (time.perf_counter() - start) / 60,
              "final_loss": sum(losses[-200:]) / min(200, len(losses))}
    return ema, record


def train_classifier(images, labels, epochs: int = 40) -> DigitsClassifier:
    torch.manual_seed(0)
    clf = DigitsClassifier().train()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(clf(shift(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=18.0, help="DiT training budget (wall clock)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=os.path.join("models", "checkpoints"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    train_x, train_y = digits_dataset("train")
    test_x, test_y = digits_dataset("test")

    clf = train_classifier(train_x, train_y)
    clf_accuracy = accuracy(test_x, test_y, clf)
    print(f"classifier test accuracy {clf_accuracy:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.save(clf.state_dict(), os.path.join(args.out, "digits_classifier.pt"))

    ema, record = train_dit(train_x, train_y, args.minutes, args.batch)
    torch.save({k: v.half() for k, v in ema.state_dict().items()}, os.path.join(args.out, "digits.pt"))

    # A quick check on the saved (float16) weights: one image per class and seed.
    ema = ema.half().float()
    settings = SAMPLING["digits"]
    labels = torch.arange(10).repeat(10)
    with torch.no_grad():
        samples = rectified_flow_sample(ema, initial_noise(100, 1, 16, seed=0), labels, steps=settings["steps"],
                                        cfg_scale=settings["cfg_scale"], null_class=10)
    record.update(
        config=PRETRAINED["digits"], sampling=settings, classifier_test_accuracy=clf_accuracy,
        sample_accuracy_seed0=accuracy(samples, labels, clf), train_images=len(train_x),
        total_minutes=(time.perf_counter() - started) / 60, torch=torch.__version__,
        command=" ".join(["python"] + sys.argv),
    )
    with open(os.path.join(args.out, "digits.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
