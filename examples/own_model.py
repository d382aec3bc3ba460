"""Bring your own model and data: a plain CNN on scikit-learn's digits, NeuLite against ExclusiveFL.

    python examples/own_model.py --rounds 12 --out results/own-model

The same network and data from a shell, Flower included, by import path (from the repository root):

    neulite run --set model.name=examples.own_model:digits_cnn --set data.name=examples.own_model:digits
"""

from __future__ import annotations

import argparse

from torch import nn

import neulite


@neulite.register_model("digits_cnn")
def digits_cnn(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> neulite.BlockModel:
    """Three blocks of two conv + BatchNorm + ReLU each; `width` scales the channels (HeteroFL-style methods)."""
    widths = [max(1, round(c * width)) for c in (32, 64, 128)]
    blocks, cin = [], input_shape[0]
    for i, cout in enumerate(widths):
        blocks.append(
            nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )
        )
        cin = cout
    return neulite.BlockModel(blocks, neulite.ClassifierHead(cin, num_classes), input_shape, num_classes)


@neulite.register_dataset("digits_arrays")
def digits(root: str | None, seed: int) -> neulite.DataSplits:
    """scikit-learn's 1,797 8x8 digits as plain arrays; a fifth, stratified by `seed`, held out for testing."""
    from sklearn.datasets import load_digits  # here, not at the top: only the loader needs scikit-learn

    data = load_digits()
    return neulite.from_arrays(data.images, data.target, test_fraction=0.2, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="results/own-model")
    args = parser.parse_args(argv)
    cfg = neulite.load_config(
        overrides=[
            "model.name=digits_cnn",
            "data.name=digits_arrays",
            "data.num_clients=10",
            "clients.per_round=5",
            f"method.rounds={args.rounds}",
        ]
    )
    summary = neulite.compare(cfg, ["neulite", "exclusivefl"], seeds=[0], out=args.out)
    for method, row in summary["methods"].items():
        print(
            f"{method}: {row['final_accuracy_mean']:.1%} test accuracy, {row['participation']:.0%} of clients took part"
        )


if __name__ == "__main__":
    main()
