"""Data that is not images: a 1-D CNN on sequences and an MLP on feature vectors, with NeuLite.

    python examples/sequences_and_vectors.py --rounds 12 --out results/non-image

Sequences are (N, C, L) arrays of C channels (a sensor's axes, say), given to `from_arrays` with
`sequences=True`; vectors are (N, F) arrays. On samples this small the networks need a megabyte or
two, mostly weights, and neulite warns that progressive training gains little on them: the example
shows the API; the savings come with activations (longer sequences, wider layers, larger batches).
Both from a shell, Flower included, by import path:

    neulite run --set model.name=examples.sequences_and_vectors:sequence_cnn \\
        --set data.name=examples.sequences_and_vectors:digit_rows
    neulite run --set model.name=examples.sequences_and_vectors:vector_mlp \\
        --set data.name=examples.sequences_and_vectors:breast_cancer --set data.num_clients=6 \\
        --set data.partition=iid
"""

from __future__ import annotations

import argparse

from torch import nn

import neulite


@neulite.register_model("sequence_cnn")
def sequence_cnn(input_shape: tuple[int, int], num_classes: int, width: float = 1.0) -> neulite.BlockModel:
    """Three blocks of two Conv1d + BatchNorm + ReLU each over a (C, L) sequence; all but the first halve L."""
    widths = [max(1, round(c * width)) for c in (32, 64, 128)]

    def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]

    blocks = [
        nn.Sequential(*conv(cin, cout, 1 if i == 0 else 2), *conv(cout, cout))
        for i, (cin, cout) in enumerate(zip([input_shape[0], *widths], widths, strict=False))
    ]
    return neulite.BlockModel(blocks, neulite.ClassifierHead(widths[-1], num_classes), input_shape, num_classes)


@neulite.register_dataset("digit_rows")
def digit_rows(root: str | None, seed: int) -> neulite.DataSplits:
    """scikit-learn's 1,797 8x8 digits read as sequences: 8 channels (the rows) along 8 steps."""
    from sklearn.datasets import load_digits  # here, not at the top: only a loader needs scikit-learn

    data = load_digits()
    return neulite.from_arrays(data.images, data.target, test_fraction=0.2, seed=seed, sequences=True)


@neulite.register_model("vector_mlp")
def vector_mlp(input_shape: tuple[int], num_classes: int, width: float = 1.0) -> neulite.BlockModel:
    """Three blocks of Linear + BatchNorm + ReLU over an (F,) feature vector."""
    widths = [max(1, round(c * width)) for c in (256, 256, 128)]
    blocks = [
        nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU())
        for i, o in zip([input_shape[0], *widths], widths, strict=False)
    ]
    return neulite.BlockModel(blocks, nn.Linear(widths[-1], num_classes), input_shape, num_classes)


@neulite.register_dataset("breast_cancer")
def breast_cancer(root: str | None, seed: int) -> neulite.DataSplits:
    """scikit-learn's 569 breast-cancer cases: 30 features, 2 classes; a quarter held out."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return neulite.from_arrays(x, y, test_fraction=0.25, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="results/non-image")
    args = parser.parse_args(argv)
    runs = {  # 426 training cases of 2 classes: an IID split leaves each of 6 clients enough of both
        ("sequence_cnn", "digit_rows"): ["data.num_clients=10"],
        ("vector_mlp", "breast_cancer"): ["data.num_clients=6", "data.partition=iid"],
    }
    for (model, data), setting in runs.items():
        overrides = [f"model.name={model}", f"data.name={data}", "clients.per_round=4", f"method.rounds={args.rounds}"]
        cfg = neulite.load_config(overrides=overrides + setting)
        summary = neulite.run_experiment(cfg, f"{args.out}/{data}")
        print(
            f"{model} on {data}: {summary['final_accuracy']:.1%} test accuracy, "
            f"{summary['participation']:.0%} of clients took part"
        )


if __name__ == "__main__":
    main()
