"""What the examples share: their command line and a plain training loop."""

import argparse

import torch


def example_arguments(docstring: str, out: str, quick_help: str) -> argparse.Namespace:
    """--quick, --device, --seed and --out, as every example takes them. On the CPU
    the examples run on one thread: the order of a sum across threads changes the
    last bits, training amplifies them, and the printed numbers would then depend on
    the machine's core count (measured: an AUROC of 0.97 on 2 threads, 0.998 on 1)."""
    parser = argparse.ArgumentParser(description=docstring.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    return args


def train_on_minibatches(model, images, labels, loss_function, n_steps, generator, batch_size=64, lr=3e-3):
    """Adam on random minibatches drawn with ``generator``; returns the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(n_steps):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator).to(images.device)
        loss = loss_function(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()

