"""Train the shipped `digits` DiT-MoE and the classifier its quality metrics use, on CPU.

    python examples/train_digits.py [--minutes 18] [--out models/checkpoints]
    python examples/train_digits.py --model digits-scmoe --steps 3132   # the ScMoE variant

Data: scikit-learn's digits at 16x16 in [-1, 1] (`moedit.models.digits_dataset`). Both
models train on the "train" split (1437 images) only; the "test" split (360) is held out
for the classifier's accuracy and as the reference set of `moedit.metrics.fd_digits`.
Augmentation: random shifts of up to one pixel (no flips: digits are not symmetric).

DiT-MoE (`PRETRAINED["digits"]` in models/pretrained.py: 6 blocks, each MoE with 8
SwiGLU experts, top-2, plus a shared expert): rectified flow as in models/sampling.py,
z_t = (1 - t) x + t noise with t logit-normal, loss MSE(v, noise - x); labels are replaced
by the null class 10 % of the time for classifier-free guidance (the model's
LabelEmbedder does this in train mode, at `class_dropout_prob`); a small Switch-style
load-balancing loss on the gates; AdamW with warmup and cosine decay, for a wall-clock
budget; an EMA of the weights, which is what is saved, in float16.

`digits-scmoe` (models/scmoe.py) trains the same way, for as many steps as `digits` took
in its 18 minutes, and is judged by the classifier trained with `digits`.

Writes to --out: MODEL.pt (EMA state dict, float16), MODEL.json (config, time, steps,
loss, classifier accuracy, sample quality over 3 seeds) and, for digits,
digits_classifier.pt.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

# [Note: passive OpenMP threads on a shared CPU]
# With another process busy on the same two cores, torch's OpenMP workers spin-wait at every
# barrier and starve each other: measured here, a training step took 3x longer with 2 threads
# than with 1. Sleeping workers remove that penalty. libgomp reads this when torch loads, so
# it must be set before the first `import torch`; an explicit setting in the shell wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moedit.models.metrics import DigitsClassifier, accuracy, fd_digits, summarize  # noqa: E402
from moedit.models import digits_dataset  # noqa: E402
from moedit.runtime.sampling import initial_noise, rectified_flow_sample  # noqa: E402
from moedit.models.dit_moe import DiTMoE  # noqa: E402
from moedit.models.pretrained import PRETRAINED, SAMPLING, build, checkpoint_path, pretrained_config  # noqa: E402


def shift(images: torch.Tensor, max_pixels: int = 1) -> torch.Tensor:
    """Shift each image [B,1,S,S] by up to `max_pixels` each way, filling with background (-1)."""
    B, _, S, _ = images.shape
    padded = F.pad(images, (max_pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_pixels + 1, (2, B)).tolist()
    return torch.stack([padded[i, :, y:y + S, x:x + S] for i, (y, x) in enumerate(zip(dy, dx))])


def balance_loss(captured: list) -> torch.Tensor:
    """Switch-Transformer load balancing: E * sum_e (share of slots routed to e) * (mean gate prob of e)."""
    losses = []
    for tokens, expert_ids, gate in captured:
        probs = F.linear(tokens, gate.weight).softmax(-1)
        share = torch.bincount(expert_ids.reshape(-1), minlength=probs.shape[-1]).float() / expert_ids.numel()
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def learning_rate(step: int, progress: float, peak: float = 1e-3) -> float:
    """Linear warmup over 200 steps, then cosine from `peak` to peak/10 as `progress` goes 0 -> 1."""
    return peak * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1))))


def train_dit(name: str, images, labels, minutes: float, steps: int | None, batch: int = 64,
              log_every: int = 200) -> tuple[DiTMoE, dict]:
    """Train model `name` for `minutes` of wall clock, or for exactly `steps` steps if given
    (reproducible on a busy machine)."""
    model = build(pretrained_config(name)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    captured = []
    for block in model.blocks:
        block.moe.gate.register_forward_hook(lambda m, inp, out: captured.append((inp[0], out[0], m)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    budget, start, step, losses = minutes * 60, time.perf_counter(), 0, []
    while (progress := (step / steps if steps else (time.perf_counter() - start) / budget)) < 1:
        elapsed = time.perf_counter() - start
        lr = learning_rate(step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (batch,))
        x, y = shift(images[idx]), labels[idx]
        noise = torch.randn_like(x)
        t = torch.sigmoid(torch.randn(batch))  # logit-normal: most samples at mid noise levels
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        captured.clear()
        loss = F.mse_loss(model(z, t, y), noise - x)  # train mode: LabelEmbedder drops labels
        opt.zero_grad(set_to_none=True)
        (loss + 0.01 * balance_loss(captured)).backward()
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
    record = {"steps": step, "batch": batch, "train_minutes": (time.perf_counter() - start) / 60,
              "final_loss": sum(losses[-200:]) / min(200, len(losses))}
    return ema, record


def train_classifier(images, labels, epochs: int = 40) -> DigitsClassifier:
    clf = DigitsClassifier().train()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(clf(shift(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()


def sample_quality(name: str, model: DiTMoE, clf: DigitsClassifier, seeds=(0, 1, 2)) -> dict:
    """Accuracy and FD-digits of 100 samples (10 per class) per seed, at the default settings."""
    labels = torch.arange(10).repeat_interleave(10)
    settings, per_seed = SAMPLING[name], {"accuracy": [], "fd_digits": []}
    for seed in seeds:
        with torch.no_grad():
            images = rectified_flow_sample(model, initial_noise(100, 1, 16, seed=seed), labels,
                                           null_class=model.null_class, **settings)
        per_seed["accuracy"].append(accuracy(images, labels, clf))
        per_seed["fd_digits"].append(fd_digits(images, clf))
    return {"sampling": settings, "seeds": list(seeds), **{f"sample_{k}": v for k, v in per_seed.items()},
            **{f"sample_{k}_summary": summarize(v) for k, v in per_seed.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", choices=sorted(PRETRAINED),
                        help="which shipped model to train; models other than digits reuse the shipped classifier")
    parser.add_argument("--minutes", type=float, default=18.0, help="DiT training budget, wall clock")
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("models", "checkpoints"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_x, train_y = digits_dataset("train")
    test_x, test_y = digits_dataset("test")

    os.makedirs(args.out, exist_ok=True)
    classifier_path = os.path.join(args.out, "digits_classifier.pt")
    if args.model == "digits":
        clf = train_classifier(train_x, train_y)
        torch.save(clf.state_dict(), classifier_path)
    else:  # every model is judged by the one classifier
        clf = DigitsClassifier().eval()
        clf.load_state_dict(torch.load(checkpoint_path("digits_classifier"), weights_only=True))
    clf_accuracy = accuracy(test_x, test_y, clf)
    print(f"classifier test accuracy {clf_accuracy:.4f} ({len(test_y)} held-out images)", flush=True)

    ema, record = train_dit(args.model, train_x, train_y, args.minutes, args.steps, args.batch)
    print(f"trained {args.model} for {record['train_minutes']:.1f} min, {record['steps']} steps, "
          f"final loss {record['final_loss']:.4f}", flush=True)
    torch.save({k: v.half() for k, v in ema.state_dict().items()}, os.path.join(args.out, f"{args.model}.pt"))

    quality = sample_quality(args.model, ema.half().float(), clf)  # judge the weights as saved, in float16
    record.update(
        model=args.model, config=PRETRAINED[args.model], parameters=sum(p.numel() for p in ema.parameters()),
        classifier_test_accuracy=clf_accuracy, train_images=len(train_x), **quality,
        total_minutes=(time.perf_counter() - started) / 60, torch=torch.__version__, threads=args.threads,
        command=" ".join(["python"] + sys.argv),
    )
    with open(os.path.join(args.out, f"{args.model}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))
    print(f"total time {record['total_minutes']:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
