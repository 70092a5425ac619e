"""Every shipped experiment's network through `transfer export` (ONNX, and the timm folder where timm can hold it),
with the export's default check (issue 25: the default model must export by default, on every experiment).

Each experiment's network is built as its config describes, with the weights available offline (the real
EfficientNet-Lite0 weights where the experiment names them; random initialization for backbones that would be
downloaded), and its head is replaced by the worst case for the check: a linear probe solved, as the frozen mode
does, on the backbone's features of 24 generated images of 3 classes (weakly regularized, so its weights and
logits are large). Then ONNX and the timm folder are written and checked as `transfer export` does.

    python scripts/export_experiments.py                        # every experiment, a table, export_experiments.json
    python scripts/export_experiments.py demo elpv_best         # some of them
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("a", "b", "c")
TINTS = ((0.15, 0.15, 0.15), (0.85, 0.85, 0.85), (0.85, 0.2, 0.2))


def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def generated_images(data_config: dict, per_class: int, seed: int):
    """(normalized images, labels): tinted noise per class at the network's input size."""
    import torch

    channels, height, width = data_config["input_size"]
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k, tint in enumerate(TINTS):
        noise = torch.rand((per_class, channels, height, width), generator=generator) * 0.3 - 0.15
        images.append((torch.tensor(tint).view(1, 3, 1, 1) + noise).clamp(0, 1))
        labels += [k] * per_class
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (torch.cat(images) - mean) / std, torch.tensor(labels)


def solve_head(model, data_config: dict) -> float:
    """Replace the head's Linear by a probe solved on the backbone's features; its largest |weight|."""
    import torch

    from transfer_cli.training.probe import fit_probe

    train_x, train_y = generated_images(data_config, 8, seed=1)
    val_x, val_y = generated_images(data_config, 4, seed=2)
    with torch.no_grad():
        features = [model.backbone(x) for x in (train_x, val_x)]
    probe = fit_probe(features[0], train_y, features[1], val_y)
    linear = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        linear.weight.copy_(probe.linear.weight)
        linear.bias.copy_(probe.linear.bias)
    return float(probe.linear.weight.detach().abs().max())


def check(name: str, out: Path) -> dict:
    import torch

    from transfer_cli.assembly.model import build_model
    from transfer_cli.commands.export import export_restored
    from transfer_cli.commands.hub import export_timm
    from transfer_cli.commands.restore import Restored
    from transfer_cli.config.compose import as_schema, compose
    from transfer_cli.errors import TransferError

    cfg = as_schema(compose([f"experiment={name}", "model.pretrained=false"]))
    torch.manual_seed(0)
    model, data_config = build_model(cfg, len(CLASSES))
    model.eval()
    row = {"experiment": name, "backbone": list(cfg.model.backbones) or cfg.model.backbone,
           "weights": cfg.model.weights or "random", "input_size": list(data_config["input_size"]),
           "head_max_abs_weight": solve_head(model, data_config)}
    meta = {"class_names": list(CLASSES), "task": "multiclass", "backbone": row["backbone"]}
    restored = Restored(out / name / "ckpt", out / name, cfg, meta, data_config, model)
    started = time.perf_counter()
    result = export_restored(restored, "onnx", out / name / "model.onnx")
    row["onnx"] = {**vars(result.agreement), "close": result.agreement.close, "exporter": result.metadata["exporter"],
                   "seconds": round(time.perf_counter() - started, 1)}
    try:
        _, agreement = export_timm(restored, out / name / "timm")
        row["timm"] = {**vars(agreement), "close": agreement.close}
    except TransferError as e:  # a feature combination or a hidden head: refused by design, with the fix
        row["timm"] = {"refused": e.message}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments (default: every one shipped)")
    parser.add_argument("--out", default="export_experiments.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names or experiments():
            try:
                row = check(name, Path(tmp))
            except Exception as e:  # one experiment's failure is a result, the others still run
                row = {"experiment": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            rows.append(row)
            onnx, timm = row.get("onnx", {}), row.get("timm", {})
            print(f"{name:34s} " + (row["error"] if "error" in row else
                  f"|W|max {row['head_max_abs_weight']:7.1f}  logits up to {onnx['largest_logit']:8.2f}  "
                  f"onnx {'ok' if onnx['close'] else 'FAILED'} ({100 * onnx['used']:.2g} % of tol, top-1 "
                  f"{onnx['top1_same']}/{onnx['samples']}, {onnx['seconds']} s)  timm " +
                  (f"refused ({timm['refused'][:40]})" if "refused" in timm else
                   f"{'ok' if timm['close'] else 'FAILED'} ({100 * timm['used']:.2g} % of tol, top-1 "
                   f"{timm['top1_same']}/{timm['samples']})")), flush=True)
    from transfer_cli.atomic import atomic_write_json

    atomic_write_json(Path(args.out), rows)
    failed = [r["experiment"] for r in rows if "error" in r or not r["onnx"]["close"]
              or not r["timm"].get("close", True)]
    print(f"{len(rows) - len(failed)}/{len(rows)} exported within the default check" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
