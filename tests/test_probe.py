"""The linear probe (training/probe.py): as accurate as scikit-learn's logistic regression on real data, the
objective it documents (class weights, multi-label, penalty scale), the folded standardization, warm starts, and
bad input.

The scikit-learn references standardize with StandardScaler fitted on the train rows, which is what the probe
does inside, so both solve the same problems.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, load_iris, make_multilabel_classification
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import average_precision_score
from sklearn.model_selection import PredefinedSplit
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from transfer_cli.data.splits import stratified_split
from transfer_cli.plots import write_probe_curve
from transfer_cli.training.probe import DEFAULT_STRENGTHS, fit_probe


def split(y, fractions=(0.6, 0.2, 0.2), seed=0):
    """Stratified train/val/test indices, drawn as the tool draws its own splits."""
    return [np.asarray(p, dtype=int) for p in stratified_split(list(y), list(fractions), seed)]


def t(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def logits(result, x):
    with torch.no_grad():
        return result.linear(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def accuracy(result, x, y):
    return float((logits(result, x).argmax(1) == y).mean())


def sklearn_quietly(model, *args):
    with warnings.catch_warnings():  # FutureWarnings about changing defaults, which differ between versions
        warnings.simplefilter("ignore")
        return model.fit(*args)


def logistic_regression_cv_on_val(x, y, tr, va):
    """scikit-learn's LogisticRegressionCV with the probe's protocol: its single 'fold' trains on the train rows
    and scores on the val rows (PredefinedSplit), it keeps that fold's model (refit=False: no refit on train+val)
    and picks C from its own default grid by val accuracy. So both see the same rows for the same purposes and
    differ only in solver and grid, which is what the comparison is about. Returns (scaler, model)."""
    scaler = StandardScaler().fit(x[tr])
    rows = np.concatenate([tr, va])
    folds = PredefinedSplit(np.r_[np.full(len(tr), -1), np.zeros(len(va), dtype=int)])
    model = LogisticRegressionCV(cv=folds, refit=False, max_iter=1000, scoring="accuracy")
    return scaler, sklearn_quietly(model, scaler.transform(x[rows]), y[rows])


def assert_chosen_has_the_lowest_val_loss(result):
    best = min(result.val_losses)
    assert result.strength == max(s for s, v in zip(result.strengths, result.val_losses) if v == best)


def assert_chosen_is_strongest_best(result):  # multi-label: by val mAP
    best = max(result.val_scores)
    assert result.strength == max(s for s, v in zip(result.strengths, result.val_scores) if v == best)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y, *split(y)


@pytest.fixture(scope="module")
def digits_probe(digits):
    x, y, tr, va, _ = digits
    return fit_probe(*t(x[tr], y[tr], x[va], y[va]))


def test_digits_probe_matches_logistic_regression_cv(digits, digits_probe):
    """Over five splits: on one, the two choices of strength differ by a few test images either way."""
    x, y, tr, va, te = digits
    ours, theirs = [], []
    for seed in range(5):
        tr_, va_, te_ = split(y, seed=seed)
        result = digits_probe if seed == 0 else fit_probe(*t(x[tr_], y[tr_], x[va_], y[va_]))
        scaler, reference = logistic_regression_cv_on_val(x, y, tr_, va_)
        ours.append(accuracy(result, x[te_], y[te_]))
        theirs.append(reference.score(scaler.transform(x[te_]), y[te_]))
    assert np.mean(ours) >= np.mean(theirs) - 0.005, f"probe {ours} vs LogisticRegressionCV {theirs} on test"
    assert min(ours) > 0.9
    result = digits_probe
    assert result.metric == "accuracy" and result.val_scores[result.index] == pytest.approx(accuracy(result, x[va], y[va]))
    assert_chosen_has_the_lowest_val_loss(result)
    assert list(result.strengths) == sorted(result.strengths, reverse=True)
    assert len(result.strengths) == len(result.val_scores) == len(result.val_losses) == len(result.iterations)
    assert all(result.converged)


def test_the_lowest_val_loss_chooses_where_accuracy_ties():
    x, y = load_iris(return_X_y=True)
    keep = y < 2  # setosa vs versicolor: linearly separable, so many strengths score a perfect 1.0 on val
    x, y = x[keep].astype(np.float32), y[keep]
    tr, va, _ = split(y, (0.5, 0.5, 0.0))
    result = fit_probe(*t(x[tr], y[tr], x[va], y[va]), patience=None)
    assert sum(v == 1.0 for v in result.val_scores) > 1
    assert_chosen_has_the_lowest_val_loss(result)
    assert result.val_scores[result.index] == 1.0


@pytest.mark.parametrize("digits_kept", [(3, 5, 8), (3, 8)])
def test_class_weights_act_as_scikit_learn_class_weight(digits, digits_kept):
    """The documented objective: lam = 1 / (C * sum of the training samples' weights). With two classes scikit-learn
    fits one logit v where the probe's head is (-v/2, v/2), whose penalty is half as large: C = 2 / (lam * sum)."""
    x, y, *_ = digits
    k = len(digits_kept)
    # The first digit common, the others rare in training.
    rows = [np.flatnonzero(y == c) for c in digits_kept]
    train = np.concatenate([r[:120] if i == 0 else r[:15] for i, r in enumerate(rows)])
    test = np.concatenate([r[120:] if i == 0 else r[15:] for i, r in enumerate(rows)])
    relabel = np.full(10, -1)
    relabel[list(digits_kept)] = np.arange(k)
    xt, yt = x[train], relabel[y[train]]
    xt = xt + np.random.default_rng(0).normal(0, 0.5, xt.shape).astype(np.float32)  # not separable: weights matter
    weights = compute_class_weight("balanced", classes=np.arange(k), y=yt)
    z_train, z_test = (StandardScaler().fit(xt).transform(a.astype(np.float64)) for a in (xt, x[test]))
    strength = 0.01
    predictions = {}
    for name, cw in (("unweighted", None), ("balanced", weights)):
        probe = fit_probe(*t(xt, yt, xt, yt), class_weights=cw, strengths=[strength], dtype=torch.float64,
                          tol=1e-8)
        total = len(yt) if cw is None else weights[yt].sum()
        reference = LogisticRegression(C=(2 if k == 2 else 1) / (strength * total), tol=1e-10, max_iter=10_000,
                                       class_weight=None if cw is None else dict(enumerate(cw)))
        sklearn_quietly(reference, z_train, yt)
        ours = torch.softmax(torch.as_tensor(logits(probe, x[test])), 1).numpy()
        np.testing.assert_allclose(ours, reference.predict_proba(z_test), atol=2e-4)
        predictions[name] = ours.argmax(1)
    assert (predictions["unweighted"] != predictions["balanced"]).any()
    # Weighting up the rare classes moves predictions towards them.
    assert (predictions["balanced"] > 0).sum() > (predictions["unweighted"] > 0).sum()


def test_multilabel_is_one_sigmoid_per_label_as_one_vs_rest():
    x, y = make_multilabel_classification(n_samples=600, n_features=30, n_classes=6, n_labels=2, random_state=0)
    x = x.astype(np.float32)
    tr, va, te = split(np.zeros(len(y), dtype=int))
    scaler = StandardScaler().fit(x[tr])
    z = scaler.transform(x)
    # The objective at one strength: scikit-learn's one-vs-rest binary problems at C = 1 / (lam * n).
    strength = 0.03
    probe = fit_probe(*t(x[tr], y[tr].astype(np.float32), x[va], y[va].astype(np.float32)), multilabel=True,
                      strengths=[strength], dtype=torch.float64, tol=1e-8)
    reference = OneVsRestClassifier(LogisticRegression(C=1 / (strength * len(tr)), tol=1e-10, max_iter=10_000))
    sklearn_quietly(reference, z[tr], y[tr])
    np.testing.assert_allclose(torch.sigmoid(torch.as_tensor(logits(probe, x[te]))).numpy(),
                               reference.predict_proba(z[te]), atol=2e-4)
    # The sweep: chosen by val mAP, as good on test as one-vs-rest logistic regression chosen the same way.
    result = fit_probe(*t(x[tr], y[tr].astype(np.float32), x[va], y[va].astype(np.float32)), multilabel=True)
    assert result.metric == "mAP"
    assert result.val_scores[result.index] == pytest.approx(average_precision_score(y[va], logits(result, x[va])))
    assert_chosen_is_strongest_best(result)
    best = None
    for lam in DEFAULT_STRENGTHS:  # the whole grid, also where the probe stopped early
        model = sklearn_quietly(OneVsRestClassifier(LogisticRegression(C=1 / (lam * len(tr)), max_iter=1000)),
                                z[tr], y[tr])
        val = average_precision_score(y[va], model.decision_function(z[va]))
        if best is None or val > best[0]:
            best = (val, average_precision_score(y[te], model.decision_function(z[te])))
    ours = average_precision_score(y[te], logits(result, x[te]))
    assert ours >= best[1] - 0.005, f"probe test mAP {ours:.4f} vs one-vs-rest {best[1]:.4f}"


def test_a_head_that_fine_tuning_starts_from_keeps_small_weights_on_features_that_barely_vary():
    """LP-FT's probe (standardize=False) penalizes raw weights: a feature with 1/1000 of the other's spread gets no
    large weight, which the first fine-tuning steps, moving that feature, would turn into large logits."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    signal = (2 * y - 1).float()
    x = torch.stack([signal + torch.randn(400, generator=g), 1e-3 * torch.randn(400, generator=g)], 1)
    tr, va = slice(0, 300), slice(300, 400)
    standardized = fit_probe(x[tr], y[tr], x[va], y[va], num_classes=2).linear.weight.detach()
    raw = fit_probe(x[tr], y[tr], x[va], y[va], num_classes=2, standardize=False).linear.weight.detach()
    print(f"weight on the quiet feature: standardized {standardized[:, 1].abs().max():.3g}, raw "
          f"{raw[:, 1].abs().max():.3g}")
    assert standardized[:, 1].abs().max() > 1  # the standardized fold: W / std
    assert raw[:, 1].abs().max() < standardized[:, 1].abs().max() / 100


def test_folded_standardization_equals_standardize_then_linear(digits):
    """A probe on raw features, applied to raw features, gives the logits of a probe fitted and applied on the
    standardized features (where the fold is the identity), and of one on rescaled, shifted features: the
    problem the solver sees is the same in all three."""
    x, y, tr, va, te = digits
    scaler = StandardScaler().fit(x[tr])
    rng = np.random.default_rng(0)
    affine = x * np.exp(rng.uniform(-2, 2, x.shape[1])).astype(np.float32) + rng.uniform(-10, 10, x.shape[1]).astype(np.float32)
    fits = {}
    for name, feats in (("raw", x), ("standardized", scaler.transform(x).astype(np.float32)), ("affine", affine)):
        result = fit_probe(*t(feats[tr], y[tr], feats[va], y[va]), strengths=[0.01], dtype=torch.float64, tol=1e-7)
        fits[name] = logits(result, feats[te])
    np.testing.assert_allclose(fits["raw"], fits["standardized"], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(fits["raw"], fits["affine"], atol=1e-3, rtol=1e-4)


def test_warm_starts_need_fewer_iterations_than_cold_starts(digits, digits_probe):
    x, y, tr, va, _ = digits
    data = t(x[tr], y[tr], x[va], y[va])
    warm = fit_probe(*data, patience=None)
    assert warm.strengths == sorted(DEFAULT_STRENGTHS, reverse=True)
    # Stopping the sweep past the peak (the default) chose what the whole grid chooses.
    assert digits_probe.strength == warm.strength and len(digits_probe.strengths) < len(warm.strengths)
    cold = [fit_probe(*data, strengths=[s]) for s in warm.strengths]
    assert sum(warm.iterations) < 0.6 * sum(sum(c.iterations) for c in cold)
    # ... and reach the same solutions: the val scores along the path agree.
    assert np.abs(np.array(warm.val_scores) - [c.val_scores[0] for c in cold]).max() <= 0.01


def test_constant_features_are_ignored(digits):
    x, y, tr, va, te = digits
    constant_in_train = x[tr].std(0) == 0  # digits has border pixels that are always 0
    assert constant_in_train.any()
    extra = np.full((len(x), 2), 7.0, dtype=np.float32)
    extra[va, 1] = 3.0  # constant in train only: the probe cannot learn anything from it
    padded = np.concatenate([x, extra], axis=1)
    result = fit_probe(*t(padded[tr], y[tr], padded[va], y[va]), strengths=[0.01])
    weight = result.linear.weight.detach().numpy()
    assert np.isfinite(weight).all() and np.isfinite(result.linear.bias.detach().numpy()).all()
    assert result.constant_features == constant_in_train.sum() + 2
    assert (weight[:, np.r_[constant_in_train, True, True]] == 0).all()
    plain = fit_probe(*t(x[tr], y[tr], x[va], y[va]), strengths=[0.01])
    np.testing.assert_allclose(logits(result, padded[te]), logits(plain, x[te]), atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "val_x": d["val_x"][:0], "val_y": d["val_y"][:0]}, "validation split is empty"),
    (lambda d: {**d, "train_x": d["train_x"].index_fill(0, torch.tensor([3]), float("nan"))}, "non-finite"),
    (lambda d: {**d, "val_x": d["val_x"].index_fill(1, torch.tensor([0]), float("inf"))}, "non-finite"),
    (lambda d: {**d, "train_y": d["train_y"] + 5}, "class indices"),
    (lambda d: {**d, "class_weights": [1.0, 2.0]}, "class_weights must be 3"),
    (lambda d: {**d, "strengths": [0.1, -1.0]}, "positive and finite"),
])
def test_bad_input_raises_value_error(change, message):
    rng = np.random.default_rng(0)
    data = {"train_x": torch.randn(30, 4), "train_y": torch.as_tensor(rng.integers(0, 3, 30)),
            "val_x": torch.randn(9, 4), "val_y": torch.as_tensor(rng.integers(0, 3, 9)), "num_classes": 3}
    with pytest.raises(ValueError, match=message):
        fit_probe(**change(data))


def test_multilabel_rejects_class_weights_and_a_val_split_without_positives():
    x, y = torch.randn(20, 3), (torch.rand(20, 2) > 0.5).float()
    with pytest.raises(ValueError, match="multi-label"):
        fit_probe(x, y, x, y, multilabel=True, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="no label has a positive"):
        fit_probe(x, y, x, torch.zeros_like(y), multilabel=True)


def test_probe_curve_png(tmp_path, digits_probe):
    result = digits_probe
    out = write_probe_curve(result, tmp_path / "probe_curve.png", title="digits")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    summary = result.summary()
    assert summary["strength"] == result.strength and len(summary["grid"]) == len(result.strengths)


@pytest.fixture(scope="module")
def elpv_features():
    """EfficientNet-Lite0 (real ImageNet weights) features of the 2,624 ELPV cells, built and preprocessed by the
    tool's own code from the demo's config; {path: feature}. ~100-500 s on 2 CPU cores."""
    pytest.importorskip("elpv_dataset")
    from torch.utils.data import DataLoader

    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.data.elpv import from_elpv
    from transfer_cli.data.images import ImageDataset
    from transfer_cli.data.transforms import eval_transform
    from transfer_cli.models.combined import build_backbone

    cfg = as_schema(compose(["experiment=demo", "data.val_fraction=0.2", "data.test_fraction=0.2"]))
    backbone, data_config = build_backbone(cfg.model, cfg.data)
    d = cfg.data
    splits = from_elpv(d.elpv_task, d.elpv_cell_type, d.val_fraction, d.test_fraction, d.split_seed)
    paths = [p for p, _ in splits.train + splits.val + splits.test]
    loader = DataLoader(ImageDataset([(p, 0) for p in paths], eval_transform(data_config)), batch_size=64)
    backbone = backbone.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = torch.cat([backbone(images.contiguous(memory_format=torch.channels_last)) for images, _ in loader])
    return cfg, dict(zip(paths, feats.numpy()))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["binary", "four_class"])
def test_elpv_lite0_probe_matches_logistic_regression_cv(elpv_features, task):
    """Mean test accuracy over five of the tool's 60/20/20 splits (stratified by this task's labels)."""
    from transfer_cli.data.elpv import from_elpv

    cfg, by_path = elpv_features
    d = cfg.data
    ours, theirs = [], []
    for seed in range(5):
        splits = from_elpv(task, d.elpv_cell_type, d.val_fraction, d.test_fraction, seed)
        parts = [splits.train, splits.val, splits.test]
        x = np.stack([by_path[p] for part in parts for p, _ in part])
        y = np.array([label for part in parts for _, label in part])
        tr, va, te = np.split(np.arange(len(y)), np.cumsum([len(p) for p in parts])[:-1])
        result = fit_probe(*t(x[tr], y[tr], x[va], y[va]))
        scaler, reference = logistic_regression_cv_on_val(x, y, tr, va)
        ours.append(accuracy(result, x[te], y[te]))
        theirs.append(reference.score(scaler.transform(x[te]), y[te]))
    assert np.mean(ours) >= np.mean(theirs) - 0.005, f"{task}: probe {ours} vs LogisticRegressionCV {theirs}"
    assert min(ours) > (0.8 if task == "binary" else 0.7)
