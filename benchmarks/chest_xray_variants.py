"""Model and schedule variants of the chest X-ray CNN under DP-SGD, measured quickly in-process.

    python benchmarks/chest_xray_variants.py --data-dir ../shared/data/pneumoniamnist \
        --epsilon 3 [--cnn '{"activation": "relu"}'] [--lr 2] [--batch-size 256] [--rounds 10]

FedAvg over 3 IID hospitals of PneumoniaMNIST's train split, exactly as ``fedcare simulate``
splits them (``shared_models.hospitals.simulated_hospitals``), each trained with
``client.training.train_round`` (Opacus DP-SGD, noise calibrated once for the run), but without
Flower's engine, so one variant costs seconds of start-up instead of a Ray cluster. Prints the
val and test AUROC after every round (val: the MedMNIST val split, drawn like the train split;
test: the official test split that ``fedcare simulate`` reports) and a JSON line at the end.
``--cnn`` passes keyword arguments to :class:`shared_models.image_models.ChestCNN`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from client.dp_modes import grad_sample_mode_for  # noqa: E402
from client.training import plan_dp, steps_per_round, train_round  # noqa: E402
from shared_models.hospitals import simulated_hospitals  # noqa: E402
from shared_models.image_models import ChestCNN  # noqa: E402
from shared_models.tasks.images import medmnist_pixels, read_medmnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/pneumoniamnist")
    parser.add_argument("--epsilon", type=float, default=3.0, help="0 = no DP")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--cnn", default="{}", help="ChestCNN keyword arguments (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.cnn)
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    hospitals = simulated_hospitals(
        "chest-xray", data_dir=str(Path(args.data_dir).resolve()), num_hospitals=3, scheme="iid",
        alpha=0.5, seed=args.seed, preprocessing="size-28", test_fraction=0.0,
    )  # fmt: skip
    npz = next(Path(args.data_dir).glob("*.npz"))
    val_u8, y_val = read_medmnist(npz)["val"]
    x_val = medmnist_pixels(val_u8, 28, npz.name)
    x_test = np.concatenate([s.x_test for s in hospitals])
    y_test = np.concatenate([s.y_test for s in hospitals])

    torch.manual_seed(args.seed)  # the initial weights (benchmark only)
    model = ChestCNN((1, 28, 28), **kwargs)
    plans = [
        plan_dp(
            n_train=s.n_train,
            batch_size=args.batch_size,
            local_epochs=args.local_epochs,
            rounds=args.rounds,
            target_epsilon=args.epsilon,
            target_delta=1e-5,
            max_grad_norm=args.max_grad_norm,
        )  # fmt: skip
        if args.epsilon > 0
        else None
        for s in hospitals
    ]
    states: list = [None] * len(hospitals)

    def auroc(x: np.ndarray, y: np.ndarray) -> float:
        model.eval()
        with torch.no_grad():
            return float(roc_auc_score(y, model(torch.from_numpy(x)).numpy()))

    started = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        updates = []
        for k, hospital in enumerate(hospitals):
            local = ChestCNN((1, 28, 28), **kwargs)
            local.load_state_dict(model.state_dict())
            result = train_round(
                local, hospital.train_set(),
                steps=steps_per_round(hospital.n_train, args.batch_size, args.local_epochs),
                batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, dp=plans[k],
                accountant_state=states[k], seed=args.seed * 1000 + rnd * 10 + k,
                grad_sample_mode=grad_sample_mode_for(local),
            )  # fmt: skip
            states[k] = result.accountant_state
            updates.append((hospital.n_train, local.state_dict()))
        total = sum(n for n, _ in updates)
        model.load_state_dict(
            {key: sum(n * sd[key] for n, sd in updates) / total for key in updates[0][1]}
        )
        print(
            f"round {rnd} val {auroc(x_val, y_val):.4f} test {auroc(x_test, y_test):.4f} "
            f"eps {result.epsilon} {time.perf_counter() - started:.0f} s", flush=True
        )  # fmt: skip
    print(json.dumps({"args": vars(args), "val_auroc": auroc(x_val, y_val),
                      "test_auroc": auroc(x_test, y_test),
                      "seconds": time.perf_counter() - started}))  # fmt: skip


if __name__ == "__main__":
    main()
