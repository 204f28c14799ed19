#!/usr/bin/env python3
"""trainq's PyTorch reference benchmark: the seed's two models in eager PyTorch, trained the way
`trainq-worker bench` trains them, so the two throughputs compare directly.

The models have the exact layer shapes and parameter names of worker/src/model.rs (the
checkpoint contract): MnistClassifier (conv1, conv2, fc1, fc2) and Cvae (conv1..conv3, fc_mu,
fc_sigma holding the log-variance, fc_dec, conv_dec1..conv_dec3; the decoder returns logits and
the loss is binary cross-entropy with logits plus beta * KL, per image, beta = 1, latent 20).
Data is random and stays on the device: n = max(8192, 2 * batch) examples, batch i taken at
offset (i * batch) % (n - batch), Adam at 1e-3, warm-up steps first, then the timed steps.

Prints one JSON line per run, with the keys of `trainq-worker bench` in its order:
  {"impl": "torch-eager", "model": "cvae", "device": "cpu", "amp": false, "batch_size": 64,
   "steps": 20, "seconds": 1.2345, "images_per_s": 1037}
The model is named as the worker names it ("mnist" for the classifier, "cvae").

Usage:
  torch_reference.py --model cvae|classifier [--batch-size N] [--steps N] [--warmup N]
                     [--threads N] [--device cpu|cuda]
Run it on the same machine, in the same session, as the benchmark it is compared with
(bench/compare-cpu.sh alternates the two).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def pool_relu(x):
    return F.relu(F.max_pool2d(x, 2))


class MnistClassifier(nn.Module):
    """Two 3x3 convolutions (padding 1), each pooled 2x2 then ReLU; 3136 -> 128 -> 10."""

    FEATURES = 7 * 7 * 64
    CLASSES = 10

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(self.FEATURES, 128)
        self.fc2 = nn.Linear(128, self.CLASSES)

    def forward(self, x):
        x = pool_relu(self.conv1(x))
        x = pool_relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def loss(self, x, labels):
        return F.cross_entropy(self(x), labels)


class Cvae(nn.Module):
    """Encoder 3 -> 32 -> 64 -> 128 (3x3, padding 1, pooled then ReLU) to 2048 features; fc_mu
    and fc_sigma to the latent; decoder fc_dec (latent + 100 -> 2048), viewed [B,128,4,4], then
    transposed convolutions 128 -> 64 -> 32 -> 3 (kernel 2, stride 2) with ReLU between."""

    FEATURES = 4 * 4 * 128
    CLASSES = 100

    def __init__(self, latent_dim=20, beta=1.0):
        super().__init__()
        self.beta = beta
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc_mu = nn.Linear(self.FEATURES, latent_dim)
        self.fc_sigma = nn.Linear(self.FEATURES, latent_dim)
        self.fc_dec = nn.Linear(latent_dim + self.CLASSES, self.FEATURES)
        self.conv_dec1 = nn.ConvTranspose2d(128, 64, 2, stride=2)
        self.conv_dec2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.conv_dec3 = nn.ConvTranspose2d(32, 3, 2, stride=2)

    def encode(self, x):
        h = pool_relu(self.conv1(x))
        h = pool_relu(self.conv2(h))
        h = pool_relu(self.conv3(h)).flatten(1)
        return self.fc_mu(h), self.fc_sigma(h)

    def decode(self, z, cond):
        h = F.relu(self.fc_dec(torch.cat([z, cond], 1))).view(-1, 128, 4, 4)
        h = F.relu(self.conv_dec1(h))
        h = F.relu(self.conv_dec2(h))
        return self.conv_dec3(h)

    def loss(self, x, cond):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.decode(z, cond)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum()
        return (recon + self.beta * kl) / x.shape[0]


def random_data(model, n, device):
    """Inputs and targets of the worker's benchmark: images in [0, 1), random labels (one-hot
    for the CVAE's condition)."""
    if model == "cvae":
        images = torch.rand(n, 3, 32, 32, device=device)
        labels = torch.randint(Cvae.CLASSES, (n,), device=device)
        return images, F.one_hot(labels, Cvae.CLASSES).float()
    images = torch.rand(n, 1, 28, 28, device=device)
    return images, torch.randint(MnistClassifier.CLASSES, (n,), device=device)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, batch, steps, warmup, device):
    torch.manual_seed(0)
    n = max(8192, 2 * batch)
    net = (Cvae() if model == "cvae" else MnistClassifier()).to(device)
    inputs, targets = random_data(model, n, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def train(k):
        loss = None
        for i in range(k):
            at = (i * batch) % (n - batch)
            loss = net.loss(inputs[at:at + batch], targets[at:at + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    train(warmup)
    synchronize(device)
    started = time.perf_counter()
    loss = train(steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    if loss is not None and not torch.isfinite(loss).item():
        raise SystemExit(f"benchmark loss is not finite: {loss.item()}")
    return {
        "impl": "torch-eager",
        "model": model,
        "device": device,
        "amp": False,
        "batch_size": batch,
        "steps": steps,
        "seconds": round(seconds, 4),
        "images_per_s": round(batch * steps / max(seconds, 1e-9)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cvae", choices=["cvae", "classifier", "mnist"],
                   help="cvae, or the MNIST classifier (classifier; mnist is the same)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    if a.batch_size < 1 or a.steps < 1 or a.warmup < 0:
        p.error("--batch-size and --steps must be at least 1, --warmup at least 0")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    model = "cvae" if a.model == "cvae" else "mnist"
    print(json.dumps(measure(model, a.batch_size, a.steps, a.warmup, a.device)), flush=True)


if __name__ == "__main__":
    main()
