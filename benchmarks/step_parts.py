"""The parts of a bare MoCo v2 step, timed one by one: what sets the limit of MoCo step / supervised step.

ResNet-18 with the CIFAR stem, batch 64, 32 px, K 4,096, plain BN (the supervised step's), in a bare loop:
the query encoder's forward + backward + SGD (what a supervised step does), the key encoder's forward pass
(no gradient), the whole MoCo step, and the small parts MoCo adds (InfoNCE forward + backward against the queue,
the momentum update, the enqueue). Prints a table and writes JSON. Not a test.

    python benchmarks/step_parts.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
from common import add_output_arguments, bare_step, output_path, time_call, write_results
from torch.nn import functional as F

from moco_lightning import MoCo
from moco_lightning.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser, "step_parts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoCo("resnet18", cifar_stem=True, dim=128, mlp=True, queue_size=4096, momentum=0.99, temperature=0.1,
                 bn="none")
    model.configure_bn(1)
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder_k.")]
    optimizer = build_optimizer(params, "sgd", lr=0.03, momentum=0.9, weight_decay=5e-4)
    im_q, im_k = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)
    q = F.normalize(torch.randn(64, 128), dim=1).requires_grad_()
    k = F.normalize(torch.randn(64, 128), dim=1)

    def query_step() -> None:  # what a supervised step does, with a stand-in loss
        _, out = model.encode_query(im_q)
        optimizer.zero_grad()
        out.sum().backward()
        optimizer.step()

    def moco_step() -> None:
        bare_step(model, optimizer, im_q, im_k)

    def infonce() -> None:
        model.contrastive_loss(q, k)[0].backward()

    parts = {
        "query forward + backward + SGD": (query_step, args.repeats),
        "key encoder forward (no gradient)": (lambda: model.encode_key(im_k), args.repeats),
        "whole MoCo step": (moco_step, args.repeats),
        "InfoNCE against the queue, forward + backward": (infonce, 20),
        "momentum update": (lambda: model.momentum_update(0.99), 20),
        "enqueue": (lambda: model.dequeue_and_enqueue(k), 20),
    }
    results = {name: round(time_call(fn, n) * 1000, 2) for name, (fn, n) in parts.items()}
    limit = (results["query forward + backward + SGD"] + results["key encoder forward (no gradient)"]) / results[
        "query forward + backward + SGD"]
    for name, ms in results.items():
        print(f"{name:<48} {ms:>9.2f} ms")
    print(f"limit of MoCo / supervised from the key forward pass: {limit:.3f}")
    payload = {"benchmark": "step_parts", "threads": args.threads, "ms_median": results,
               "limit_ratio": round(limit, 3),
               "command": f"python benchmarks/step_parts.py --threads {args.threads}"}
    write_results(payload, output_path(args, "step_parts.json"))


if __name__ == "__main__":
    main()
