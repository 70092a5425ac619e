"""Fine-tuning against the frozen probe on ELPV, per epoch budget (issue 26, items 1 and 6).

The setting of the issue's table: ELPV binary, one 75/25 split per seed, 160 px, the offline EfficientNet-Lite0
ImageNet weights, the final weights tested (no validation split). Arms, each on your own data's recipe:

    probe          transfer=feature_extract (the solved linear probe; the epoch budget does not apply)
    fine_tune      transfer=fine_tune
    fine_tune_bn   transfer=fine_tune transfer.bn=eval (every BatchNorm on the pretrained statistics)
    lp_ft          transfer=fine_tune transfer.head_init=probe (BatchNorm of the trained stages on batch statistics)
    lp_ft_bn       transfer=fine_tune transfer.head_init=probe transfer.bn=eval
    elpv_best      experiment=elpv_best at this size and budget (the best recipe for these cells)

    python scripts/finetune_vs_probe.py --run [--epochs 4 10 15] [--seeds 0] [--arms probe lp_ft_bn]
    python scripts/finetune_vs_probe.py            # only the table, from the run dirs already there
    python scripts/finetune_vs_probe.py --print    # only the commands
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

SETTING = ["data=elpv", "model=efficientnet_lite0_offline", "data.image_size=160", "data.val_fraction=0",
           "data.test_fraction=0.25", "callbacks.test_ckpt=last"]
ARMS = {
    "probe": ["transfer=feature_extract"],
    "fine_tune": ["transfer=fine_tune"],
    "fine_tune_bn": ["transfer=fine_tune", "transfer.bn=eval"],
    "lp_ft": ["transfer=fine_tune", "transfer.head_init=probe"],
    "lp_ft_bn": ["transfer=fine_tune", "transfer.head_init=probe", "transfer.bn=eval"],
    "elpv_best": ["experiment=elpv_best"],
}
ROOT = Path("outputs") / "finetune_vs_probe"


def run_dir(arm: str, epochs: int, seed: int) -> Path:
    return ROOT / (f"{arm}_seed{seed}" if arm == "probe" else f"{arm}_{epochs}ep_seed{seed}")


def command(arm: str, epochs: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "transfer_cli", "train", *SETTING, *ARMS[arm], f"trainer.max_epochs={epochs}",
            f"seed={seed}", f"data.split_seed={seed}", f"hydra.run.dir={run_dir(arm, epochs, seed)}"]


def result(arm: str, epochs: int, seed: int) -> dict | None:
    path = run_dir(arm, epochs, seed) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the missing runs first")
    parser.add_argument("--print", action="store_true", help="print the commands and stop")
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 10, 15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    for epochs in args.epochs:
        for seed in args.seeds:
            for arm in args.arms:
                if arm == "probe" and epochs != args.epochs[0]:
                    continue
                cmd = command(arm, epochs, seed)
                if args.print:
                    print(" ".join(shlex.quote(c) for c in ["transfer", *cmd[3:]]))
                elif args.run and result(arm, epochs, seed) is None:
                    print("running:", " ".join(cmd[3:]), flush=True)
                    subprocess.run(cmd, check=True)
    if args.print:
        return
    print("| epochs | " + " | ".join(args.arms) + " |\n|---|" + "---|" * len(args.arms))
    for epochs in args.epochs:
        cells = []
        for arm in args.arms:
            accs = [r["test_acc"] for s in args.seeds if (r := result(arm, epochs, s)) and r.get("test_acc") is not None]
            walls = [r["wall_time_s"] for s in args.seeds if (r := result(arm, epochs, s))]
            if not accs:
                cells.append("missing")
                continue
            spread = f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            cells.append(f"{100 * statistics.mean(accs):.2f}{spread} ({statistics.mean(walls):.0f} s)")
        print(f"| {epochs} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
