"""B12: hfedmoe + FedAdam vs FedAvg in B8's regime (server optimisers composed with HFedMoE).

B8's AG News setting, unchanged (its config builder, imported): the partitioned MiniLM,
6 x 32 experts, top-4; 50 clients, Dirichlet(0.5); trace budgets with `device_memory:
headroom` at memory scale 0.005; 30 rounds, 5 clients a round, 2 local steps, lr 3e-4.
The strategy is `hfedmoe` throughout; only `federation.server_update` changes:

* fedavg: the aggregate is the next model, B8's hfedmoe run; ``--fedavg-from DIR`` takes
  B8's saved record for it after checking that its config is this one but for the name
  (the FedAvg path adds nothing to a run, so a rerun should repeat B8 bit for bit; this
  saves two runs on a busy machine);
* fedadam at each server lr of ``--fedadam-lrs`` (Reddi et al. 2021 defaults otherwise:
  beta1 0.9, beta2 0.99, tau 1e-3); every lr tried is reported;
* fedavgm (lr 1, momentum 0.9) with ``--fedavgm``.

2 seeds, in process, one torch thread per run; each run is saved as it finishes and
skipped when rerun.

    python bench/b12_server_optimisers.py [--data ../shared/data/ag_news] \
        [--fedadam-lrs 0.01 0.003] [--fedavgm] [--seeds 2] [--seed N] [--out bench/results/b12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from b4_paper_claims import plot
from b8_paper_regime import TARGET, regime_arguments, run_saved, table
from b8_paper_regime import config as b8_config
from common import machine_info


def variants(args: argparse.Namespace) -> dict[str, dict | str]:
    """Label -> federation.server_update."""
    chosen: dict[str, dict | str] = {"hfedmoe+fedavg": "fedavg"}
    for lr in args.fedadam_lrs:
        chosen[f"hfedmoe+fedadam(lr={lr:g})"] = {"name": "fedadam", "params": {"lr": lr}}
    if args.fedavgm:
        chosen["hfedmoe+fedavgm"] = "fedavgm"
    return chosen


def reuse_b8(b8_path: Path, raw: dict, path: Path, label: str) -> None:
    """Save B8's hfedmoe record as this FedAvg run, if its config is this one."""
    record = json.loads(b8_path.read_text())
    mine = json.loads(json.dumps(raw))  # the same JSON types as the saved record's
    mine["federation"].pop("server_update")
    theirs = {**record["config"], "name": mine["name"]}
    if theirs != mine:
        raise SystemExit(f"{b8_path}: its config is not B12's FedAvg config; rerun without it")
    path.write_text(json.dumps({**record, "strategy": label, "reused_from": str(b8_path)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    regime_arguments(parser)
    parser.add_argument("--fedadam-lrs", type=float, nargs="+", default=[0.01, 0.003])
    parser.add_argument("--fedavgm", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, help="run only this seed (two processes, two cores)")
    parser.add_argument("--only", nargs="+", help="run only these labels (the table: all saved)")
    parser.add_argument("--fedavg-from", type=Path, help="B8's results directory (see above)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/b12"))
    args = parser.parse_args()
    args.data, args.traces = args.data.resolve(), args.traces.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    (args.out / "machine.json").write_text(json.dumps(machine_info(), indent=1))
    chosen = variants(args)
    records = []
    seeds = [args.seed] if args.seed is not None else range(args.seeds)
    for seed in seeds:  # seed by seed: an interrupted run has equal seeds
        for label, server_update in chosen.items():
            path = args.out / f"ag_news-{label}-s{seed}.json"
            if args.only and label not in args.only and not path.is_file():
                continue
            raw = b8_config("ag_news", "hfedmoe", seed, args)
            raw["name"] = f"b12-{label}-s{seed}"
            raw["federation"]["server_update"] = server_update
            if label == "hfedmoe+fedavg" and args.fedavg_from and not path.is_file():
                reuse_b8(args.fedavg_from / f"ag_news-hfedmoe-s{seed}.json", raw, path, label)
            labels = {"dataset": "ag_news", "strategy": label, "seed": seed}
            record = run_saved(path, raw, TARGET["ag_news"], labels)
            print(f"{label} seed {seed}: {record['summary']}", flush=True)
            records.append(record)
    report = table(records, list(chosen), TARGET["ag_news"])
    (args.out / "ag_news-table.md").write_text(report + "\n")
    plot(records, args.out / "ag_news-accuracy.png", list(chosen), TARGET["ag_news"])
    print(report)


if __name__ == "__main__":
    main()
