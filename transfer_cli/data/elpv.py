"""The `elpv` data source: the ELPV solar-cell electroluminescence images shipped by the elpv-dataset package.

2624 grayscale 300x300 cells of mono- and polycrystalline modules, each labelled with a defect probability
in {0, 1/3, 2/3, 1}. The images are licensed CC-BY-NC-SA-4.0 (non-commercial), hence the optional `demo`
extra and the licence in every source description.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from transfer_cli.data.splits import DataSplits, Sample, split_fractions, split_samples
from transfer_cli.errors import TransferError

_ELPV_LICENSE = "CC-BY-NC-SA-4.0"
ELPV_CLASSES = {
    "binary": ["functional", "defective"],
    "four_class": ["functional", "possibly_defective", "likely_defective", "defective"],
}


def elpv_labels_file() -> Path:
    try:
        import elpv_dataset
    except ImportError as e:
        raise TransferError(
            "data.source=elpv needs the elpv-dataset package", "pip install 'transfer-cli[demo]'"
        ) from e
    return Path(elpv_dataset.__file__).parent / "data" / "labels.csv"


def from_elpv(task: str, cell_type: str, val_fraction: float, test_fraction: float, split_seed: int) -> DataSplits:
    """The 2624 ELPV cells as (path, label) samples, split by `split_seed`; `task`: binary | four_class,
    `cell_type`: all | mono | poly."""
    if task not in ELPV_CLASSES:
        raise TransferError(f"unknown data.elpv_task '{task}'", "use data.elpv_task=binary|four_class")
    if cell_type not in ("all", "mono", "poly"):
        raise TransferError(f"unknown data.elpv_cell_type '{cell_type}'", "use data.elpv_cell_type=all|mono|poly")
    labels_file = elpv_labels_file()
    samples: List[Sample] = []
    # The same whitespace-separated format that elpv_dataset.utils.load_dataset reads with np.genfromtxt;
    # parsed by hand so that only paths are kept, not 2624 decoded images.
    for line in labels_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        rel, prob, kind = parts[0], float(parts[1]), parts[2]
        if cell_type != "all" and kind != cell_type:
            continue
        label = int(prob >= 0.5) if task == "binary" else int(round(prob * 3))
        samples.append((str(labels_file.parent / rel), label))
    fractions = split_fractions(val_fraction, test_fraction, True)
    train, val, test = split_samples(samples, fractions, int(split_seed))
    desc = (
        f"ELPV solar cells (elpv-dataset, license {_ELPV_LICENSE}; task={task}, cells={cell_type}, "
        f"split_seed={split_seed})"
    )
    return DataSplits(list(ELPV_CLASSES[task]), train, val, test, desc)


__all__ = ["from_elpv", "elpv_labels_file", "ELPV_CLASSES"]
