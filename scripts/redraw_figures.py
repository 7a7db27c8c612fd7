"""Redraw every run's figures under a results folder from its saved history and weights, on the CPU.

    python scripts/redraw_figures.py --results results/main --data-dir ./data

For when the plotting code changes after a GPU run: no retraining needed. (The gallery's
predictions come from an fp32 CPU forward pass; the run itself evaluated in bf16 on the GPU, so a
borderline image can differ.)
"""
import argparse
import json
import sys
from pathlib import Path

from normstudy import checkpoints, data, models, recipe as recipe_lib, report, run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results/main")
    p.add_argument("--data-dir", default="./data")
    args = p.parse_args()
    try:
        dataset = data.load_cifar10(args.data_dir, download=False)
        for record_path in sorted(Path(args.results).glob("*/record.json")):
            record = json.loads(record_path.read_text())
            model = models.CifarNet(record["config"]["norm"], **recipe_lib.model_kwargs(record["recipe"]))
            # Weights saved before checksums existed are refused, naming the file: rerun that run.
            checkpoints.load_weights(model, record_path.parent / "weights.pt")
            run.write_run_figures(record_path.parent, record, model=model, device="cpu", dataset=dataset)
            print("redrew", record_path.parent)
    except (checkpoints.CheckpointError, data.DatasetError) as err:
        print(f"redraw_figures.py: error: {err}", file=sys.stderr)
        return 2
    print(report.write_summary(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
