"""The hostile battery (issue 25): inputs and faults a user really makes, each answered with a clear error and a
fix (`error:` and `fix:` lines, exit 2, no traceback) or with the right result, nothing lost. One test per case,
each named after its case:

1. unicode and spaces in paths and class names: test_case1_...
2. logger=mlflow with a damaged or read-only store: test_case2_...
3. SIGTERM during the feature pre-pass: test_case3_...
4. a run dir inside the data folder: test_case4_...
5. bad images in the test split, in eval and predict inputs and in fine-tune mode; CSVs with a BOM and CRLF
   line ends, a missing column, a val label absent from train, one class: test_case5_...; an image rewritten
   with its size and mtime kept after caching: test_feature_cache.py
   test_image_rewritten_with_the_same_size_and_mtime_is_recomputed.

The cases already covered elsewhere (bad values, run dirs that are files or in use, Ctrl+C, damaged checkpoints
and cache files, ...) are in test_bad_inputs.py and the files it names.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROBE, _make_image_folder, load_ckpt, tiny_cfg, tiny_run_overrides, transfer, transfer_popen
from test_bad_inputs import refused, tree_hash

from transfer_cli.commands.evaluate import eval_command
from transfer_cli.commands.export import export_command
from transfer_cli.commands.predict import predict_command
from transfer_cli.errors import TransferError
from transfer_cli.train import train

CLASSES = ("café noir", "chat blanc")
HEAD = ("trainer.max_epochs=1", "augmentation=none", "transfer.head_solver=sgd")  # cached features, one epoch


def quoted(key: str, value) -> str:
    """A path value as Hydra's grammar needs it when it holds spaces: key="value" (one shell word)."""
    return f'{key}="{value}"'


def csv_cfg(run_dir: Path, manifest: Path):
    """A tiny run (conftest tiny_run_overrides) on the manifest `manifest`, in `run_dir`."""
    from transfer_cli.config.compose import compose

    args = [a for a in tiny_run_overrides("unused", run_dir, *HEAD) if not a.startswith(("data=", "data.root="))]
    return compose([*args, "data=csv", f"data.csv={manifest}"])


@pytest.fixture(scope="module")
def spaced(tmp_path_factory):
    """One finished CLI run on data whose root, class folders and run dir hold spaces and non-ASCII letters, with
    an unreadable image in the train and in the test split; shared by the tests that point commands at it."""
    base = tmp_path_factory.mktemp("battery")
    root = _make_image_folder(base / "my data é", classes=CLASSES, bad=1)  # train/café noir/corrupt000.png
    shutil.copytree(root / "val", root / "test")
    (root / "test" / CLASSES[0] / "broken.png").write_bytes(b"not an image at all")
    run = base / "run dir ü"
    args = [a for a in tiny_run_overrides(root, None, *HEAD) if not a.startswith("data.root=")]
    out = transfer("train", *args, quoted("data.root", root), quoted("hydra.run.dir", run), cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    return base, root, run


def test_case1_unicode_and_spaces_survive_train_eval_predict_export(spaced):
    base, root, run = spaced
    assert sorted(p.name for p in base.iterdir()) == ["my data é", "run dir ü"]  # the quoted run dir, no stray '"/'
    # unquoted, Hydra cannot parse the space: refused with the quoting that works, before anything runs
    message = refused(transfer("train", "data=imagefolder", f"data.root={root}", cwd=base, probe=True),
                      "could not parse the overrides")
    assert f"""fix: quote the value for Hydra too: 'data.root="{root}"'""" in message
    ckpt = load_ckpt(run / "checkpoints" / "best.ckpt")
    assert ckpt["transfer"]["class_names"] == list(CLASSES)
    assert json.loads((run / "summary.json").read_text())["class_names"] == list(CLASSES)

    # commands take their key=value arguments whole: no quoting needed (in this process: the CLI's own calls)
    eval_command([f"ckpt={run}", "split=val", f"output={base / 'eval out é'}"])
    report = json.loads((base / "eval out é" / "eval_report.json").read_text())
    assert report["class_names"] == list(CLASSES) and report["num_images"] == 8

    out_csv = base / "préds dir" / "prédictions 1.csv"
    predict_command([f"ckpt={run}", f"input={root / 'val'}", f"output={out_csv}"])
    with open(out_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["label"] for r in rows} <= set(CLASSES)
    assert {r["top1_label"] for r in rows} | {r["top2_label"] for r in rows} == set(CLASSES)
    assert all(Path(r["path"]).parent.name in CLASSES for r in rows)

    export_command([f"ckpt={run}", "format=onnx"])
    meta = json.loads((run / "export" / "model.onnx.json").read_text())
    assert meta["class_names"] == list(CLASSES)


def test_case5_a_bad_image_in_the_test_split_and_in_eval_and_predict_inputs_is_skipped_and_named(spaced, capsys):
    base, root, run = spaced
    broken = str(root / "test" / CLASSES[0] / "broken.png")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_images"] == 2 and summary["test_acc"] is not None  # the run tested the 8 readable ones
    assert broken in (run / "bad_images.txt").read_text()

    eval_command([f"ckpt={run}", "split=test", f"output={base / 'eval test'}"])
    report = json.loads((base / "eval test" / "eval_report.json").read_text())
    assert report["num_images"] == 8 and [b[0] for b in report["bad_images"]] == [broken]  # not train's too

    inputs = base / "inputs"
    inputs.mkdir()
    shutil.copy(root / "val" / CLASSES[1] / "img000.png", inputs / "good.png")
    (inputs / "garbage.jpg").write_bytes(b"\x00\x01 garbage")
    (inputs / "truncated.png").write_bytes((root / "val" / CLASSES[1] / "img001.png").read_bytes()[:120])
    predict_command([f"ckpt={run}", f"input={inputs}", f"output={base / 'p.csv'}"])
    assert "predicted 1 image(s), 2 unreadable" in capsys.readouterr().out
    with open(base / "p.csv", encoding="utf-8", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["good.png"]["label"] in CLASSES and not rows["good.png"]["error"]
    assert rows["garbage.jpg"]["error"] and not rows["garbage.jpg"]["label"]
    assert "truncated" in rows["truncated.png"]["error"]


def test_case5_bad_images_in_every_split_of_a_fine_tune_run_are_skipped_and_named(tmp_path):
    root = _make_image_folder(tmp_path / "d", bad=1)  # garbage in train/cat
    shutil.copytree(root / "val", root / "test")
    (root / "val" / "dog" / "cut.png").write_bytes((root / "val" / "dog" / "img000.png").read_bytes()[:100])
    (root / "test" / "cat" / "zero.png").write_bytes(b"")
    summary = train(tiny_cfg(tmp_path, root, "trainer.max_epochs=1", "transfer=fine_tune"))
    assert summary["feature_cache"] is False and summary["bad_images"] == 3
    assert summary["val_acc"] is not None and summary["test_acc"] is not None
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert all(name in listed for name in ("corrupt000.png", "cut.png", "zero.png"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# ---------------------------------------------------------------- 2: the MLflow store


@pytest.mark.parametrize("store_kind", ["sqlite file", "folder"])
def test_case2_an_mlflow_store_of_garbage_stops_the_run_before_training(tmp_path, store_kind):
    pytest.importorskip("mlflow")
    root = _make_image_folder(tmp_path / "d")
    folder = tmp_path / "store"
    folder.mkdir()
    if store_kind == "sqlite file":
        garbage, uri = folder / "mlflow.db", f"sqlite:///{folder / 'mlflow.db'}"
        message, fix = f"cannot use the MLflow store {garbage}: not an SQLite database", f"mv '{garbage}'"
    else:  # a folder store (./mlruns) whose experiment record is garbage
        garbage, uri = folder / "0" / "meta.yaml", folder.as_uri()
        message, fix = f"cannot use the MLflow store {uri}: MlflowException", "sqlite:///<folder>/mlflow.db"
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(os.urandom(4096))
    before = tree_hash(folder)
    with pytest.raises(TransferError) as err:
        train(tiny_cfg(tmp_path, root, *HEAD, "logger=mlflow", f"logger.tracking_uri={uri}"))
    assert message in err.value.message and fix in err.value.fix and "logger=csv" in err.value.fix
    assert tree_hash(folder) == before  # the user's store as it was
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
    # nothing lost: the same run dir takes the run once the store is dealt with
    assert train(tiny_cfg(tmp_path, root, *HEAD, "logger=csv"))["val_acc"] is not None


def test_case2_a_read_only_mlflow_store_folder_is_refused_before_torch_loads(tmp_path):
    """As root (CI containers) a chmod does not stop a write: the CLI then runs without the capability that
    overrides file permissions (setpriv), so the folder is read-only for it as for any user."""
    root = _make_image_folder(tmp_path / "d")
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    run = tmp_path / "run"
    try:
        out = subprocess.run([*prefix, sys.executable, "-c", PROBE, "train", *tiny_run_overrides(root, None, *HEAD),
                              "logger=mlflow", f"logger.tracking_uri=sqlite:///{store / 'mlflow.db'}",
                              f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        store.chmod(0o755)
    refused(out, f"cannot use the MLflow store {store / 'mlflow.db'}: {store} is not writable", "logger=csv")
    assert "HEAVY []" in out.stderr  # before torch, and long before MLflow's ~100 s of retries
    assert list(store.iterdir()) == [] and not run.exists()


# ---------------------------------------------------------------- 3: SIGTERM in the feature pre-pass


@pytest.mark.slow
def test_case3_sigterm_during_the_feature_prepass_exits_cleanly_and_a_rerun_succeeds(tmp_path, caplog):
    import numpy as np
    from conftest import write_class_images

    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for k, c in enumerate(("cat", "dog")):
        write_class_images(root / "train" / c, k, 8, 32, rng)
        write_class_images(root / "val" / c, k, 150, 32, rng)  # a val pass long enough to be signalled in
    args = ["train", *tiny_run_overrides(root, None, *HEAD, "data.eval_batch_size=4"), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = transfer_popen(*args, cwd=tmp_path)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "feature cache miss: computing val features" in line:  # train's entry is stored; val is under way
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out
    assert "stopped by signal (15) before training started" in out and "Start it again: transfer train" in out
    cache = tmp_path / "feature-cache" / "features"
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("train-") and entries[0].endswith(".pt"), entries  # no partial
    assert not (tmp_path / "run" / ".transfer.lock").exists()

    with caplog.at_level("INFO", logger="transfer_cli"):  # the same run again, in the same run dir
        summary = train(tiny_cfg(tmp_path, root, *HEAD, "data.eval_batch_size=4"))
    assert "feature cache hit: train" in caplog.text and "feature cache miss: computing val" in caplog.text
    assert summary["val_acc"] is not None and summary["run_dir"] == str(tmp_path / "run")


# ---------------------------------------------------------------- 4: a run dir inside the data


@pytest.mark.parametrize("where", ["hydra.run.dir", "the default run dir"])
def test_case4_a_run_dir_inside_the_data_folder_is_refused_before_torch_loads(tmp_path, where):
    root = _make_image_folder(tmp_path / "flowers", layout="flat")
    before = tree_hash(root)
    if where == "hydra.run.dir":
        out = transfer(*["train", *tiny_run_overrides(root, None, *HEAD)], f"hydra.run.dir={root / 'cat' / 'run1'}",
                       cwd=tmp_path, probe=True)
        inside = root / "cat" / "run1"
    else:  # run from inside the data folder: ./outputs/... would be a class folder "outputs"
        out = transfer(*["train", *tiny_run_overrides(".", None, *HEAD)], cwd=root, probe=True)
        inside = root / "outputs"
    refused(out, f"the run dir {inside} is inside the data folder data.root={root}", "put runs outside")
    assert "HEAVY []" in out.stderr
    assert tree_hash(root) == before and sorted(p.name for p in root.iterdir()) == ["cat", "dog"]


def test_case4_a_csvs_folder_may_hold_runs(tmp_path):
    """A CSV names its images, so nothing reads its folder: runs beside it are fine (the common layout)."""
    root = _make_image_folder(tmp_path / "project")
    rows = ["path,label"] + [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.glob("*/*/*.png"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    summary = train(csv_cfg(root / "run", root / "labels.csv"))
    assert summary["run_dir"] == str(root / "run")


# ---------------------------------------------------------------- 5: CSV manifests


def _manifest(tmp_path, text: str, name: str = "labels.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def images(tmp_path):
    return _make_image_folder(tmp_path / "d")


def _rows(root: Path, split: bool) -> list[str]:
    out = []
    for part in ("train", "val"):
        for p in sorted((root / part).glob("*/*.png")):
            out.append(f"{p},{p.parent.name}" + (f",{part}" if split else ""))
    return out


def test_case5_a_csv_with_a_bom_and_crlf_line_ends_trains(tmp_path, images):
    text = "\r\n".join(["Path,Label,Split", *_rows(images, split=True)]) + "\r\n"
    manifest = _manifest(tmp_path, text, encoding="utf-8-sig")  # as Excel saves "CSV UTF-8"
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in manifest.read_bytes()
    summary = train(csv_cfg(tmp_path / "run", manifest))
    assert summary["class_names"] == ["cat", "dog"] and (summary["train_size"], summary["val_size"]) == (16, 8)


@pytest.mark.parametrize("case,body,in_message,in_fix", [
    ("a missing column", lambda rows: ["path,split"] + [",".join(r.split(",")[::2]) for r in rows],
     "has no 'label' column (header: path, split)", "path,label[,split]"),
    ("a val label absent from train", lambda rows: ["path,label,split"] + rows[:-1] + [rows[-1].replace(",dog,", ",bird,")],
     "labels bird appear in val/test rows but never in train", "add training rows"),
    ("one class", lambda rows: ["path,label,split"] + [r.replace(",dog,", ",cat,") for r in rows],
     "found a single class (cat)", "add a folder (or label) for each class"),
], ids=["missing_column", "val_label_not_in_train", "one_class"])
def test_case5_a_csv_that_cannot_train_a_classifier_is_refused_with_a_fix(tmp_path, images, case, body, in_message,
                                                                           in_fix):
    manifest = _manifest(tmp_path, "\n".join(body(_rows(images, split=True))) + "\n")
    before = manifest.read_bytes()
    with pytest.raises(TransferError) as err:
        train(csv_cfg(tmp_path / "run", manifest))
    assert in_message in err.value.message and in_fix in err.value.fix, (case, err.value)
    assert manifest.read_bytes() == before and not (tmp_path / "run" / "checkpoints").exists()
