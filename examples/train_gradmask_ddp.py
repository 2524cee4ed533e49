"""GradMask under DistributedDataParallel: the experiment of train_gradmask.py on ranks.

The same synthetic lesion images (captum_gradmask.datasets.lesions), the same small
CNN and the same penalty: in training every class-1 image and no class-0 image
carries an artifact, at test half of each class does. This script trains one
artifact kind (default: the binary marker, whose flat response defeats the plain
gradient penalty) with two settings, the cross-entropy baseline and the recommended
GradMask (contrast saliency, expected gradients from healthy training images,
sq_l2), over a few seeds. Each rank trains on its share of the training set
(DistributedSampler) with the GradMask module wrapping the DDP model; DDP averages
the gradients. Rank 0 prints the test
AUC table and saves a figure of integrated-gradient maps.

    torchrun --nproc_per_node=2 examples/train_gradmask_ddp.py --quick

The backend is gloo on CPU, nccl on CUDA (one GPU per rank).

With reduction="mean" each rank averages the penalty over its own masked images and
DDP averages the ranks, so ranks with more masked images weigh each a little less
than a single process on the whole batch would; for training this does not matter.
"""

import argparse
import os
import pathlib
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from captum_gradmask.datasets.lesions import ARTIFACTS, confounded_lesions

# The main example's model, data settings and figure (the script's own folder is on
# sys.path, from any working directory).
from train_gradmask import (
    BATCH_SIZE,
    LEARNING_RATE,
    N_TRAIN,
    RECOMMENDED,
    SETTINGS as MAIN_SETTINGS,
    TEST_CONFOUND,
    TRAIN_CONFOUND,
    artifact_effect,
    make_gradmask,
    print_table,
    save_figure,
    small_cnn,
    test_auc,
)

SETTINGS = [MAIN_SETTINGS[0], RECOMMENDED]  # the baseline and the recommended GradMask


def init_distributed(device_kind: str) -> torch.device:
    """Join the process group torchrun set up; return this rank's device."""
    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    torch.set_num_threads(1)  # these small convolutions run faster on one thread
    dist.init_process_group("gloo")
    return torch.device("cpu")


def train(setting, train_set, n_epochs, seed, device):
    """Adam on this rank's share of each epoch; the penalty on images with a mask."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = DistributedDataParallel(small_cnn().to(device))
    torch.manual_seed(1000 * seed + dist.get_rank())  # expected-gradients path points
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    gradmask = make_gradmask(setting, model, train_set)
    dataset = TensorDataset(train_set.images, train_set.labels, train_set.masks)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE // dist.get_world_size(), sampler=sampler)
    for epoch in range(n_epochs):
        sampler.set_epoch(epoch)
        for images, labels, masks in loader:
            if gradmask is None:
                loss = F.cross_entropy(model(images), labels)
            else:
                outputs, penalty = gradmask(images, masks, has_mask=labels == 1)
                loss = F.cross_entropy(outputs, labels) + setting.weight * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.module.eval()


def run_experiment(artifact, seeds, n_epochs, n_test, device):
    """Train every setting for every seed on all ranks; on rank 0, the test AUC and
    artifact effect per setting and seed, the first seed's models and test set (for
    the figure)."""
    aucs = {setting.name: [] for setting in SETTINGS}
    effects = {setting.name: [] for setting in SETTINGS}
    first_models, first_test_set = {}, None
    for seed in seeds:
        train_set = confounded_lesions(N_TRAIN, artifact=artifact, confound=TRAIN_CONFOUND,
                                       seed=2 * seed, device=device)
        test_set = confounded_lesions(n_test, artifact=artifact, confound=TEST_CONFOUND,
                                      seed=2 * seed + 1, device=device)
        if first_test_set is None:
            first_test_set = test_set
        for setting in SETTINGS:
            model = train(setting, train_set, n_epochs, seed, device)
            if dist.get_rank() == 0:
                aucs[setting.name].append(test_auc(model, test_set))
                effects[setting.name].append(artifact_effect(model, test_set, artifact))
                first_models.setdefault(setting.name, model)
    return aucs, effects, first_models, first_test_set


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 seeds, fewer epochs and test images")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--artifact", choices=ARTIFACTS, default="marker")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default: 3 with --quick, else 8)")
    parser.add_argument("--out", default="outputs/train_gradmask_ddp.png")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    # The double backward leaves the first convolution's weight gradient (one input
    # channel) with another stride on its size-1 dimension than DDP's bucket; DDP
    # copies it, with the same values. A performance note only, on this tiny layer.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    start = time.perf_counter()
    device = init_distributed(args.device)
    n_seeds = args.seeds or (3 if args.quick else 8)
    n_epochs = 10 if args.quick else 19  # ~150 or ~300 steps of 32, as train_gradmask.py
    n_test = 400 if args.quick else 1000
    aucs, effects, first_models, first_test_set = run_experiment(
        args.artifact, range(n_seeds), n_epochs, n_test, device
    )
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks ({dist.get_backend()}); {N_TRAIN} training images, "
              f"{n_epochs} epochs of global batch {BATCH_SIZE}")
        print_table({args.artifact: (aucs, effects)}, n_seeds, SETTINGS)
        out = pathlib.Path(args.out)
        save_figure(out, {args.artifact: (first_models, first_test_set)})
        print(f"\nfigure: {out}   total time {time.perf_counter() - start:.1f} s")
    # Every rank waits for rank 0's figure: a rank that tore its process group down
    # while the other still ran aborted now and then ("terminate called without an
    # active exception", 1 run in 13).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
