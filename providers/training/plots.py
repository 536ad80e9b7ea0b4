"""PNG plots of a run's curves, for people on a remote box without a browser: RUN_DIR/plots/*.png.

The same curves as the dashboard, from metrics.jsonl (and ranks/*.json for FSDP jobs), drawn with
matplotlib's Agg backend (no display). `python -m providers.training.plots RUN_DIR` redraws them.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

from .run_files import RunFiles

# file name -> (title, y label, [(metrics key, legend label)])
PLOTS = {
    "loss": ("Loss", "loss", [("loss", "train"), ("eval_loss", "validation")]),
    "learning_rate": ("Learning rate", "lr", [("learning_rate", "learning rate")]),
    "tokens_per_s": ("Training throughput", "tokens / s", [("tokens_per_s", "tokens/s")]),
    "dpo_rewards": ("DPO rewards", "reward", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                                              ("rewards/margins", "margin")]),
    "dpo_accuracy": ("DPO reward accuracy", "accuracy", [("rewards/accuracies", "accuracy")]),
    # GRPO (TRL's GRPOTrainer names); "*" is each grader's name
    "grpo_reward": ("GRPO reward", "reward", [("reward", "mean"), ("reward_std", "std")]),
    "grpo_graders": ("GRPO reward per grader", "reward", [("rewards/*/mean", "*")]),
    "grpo_kl": ("GRPO KL to the reference", "KL", [("kl", "KL")]),
    "grpo_completion_length": ("GRPO completion length", "tokens", [("completions/mean_length", "mean")]),
    "grpo_clip_ratio": ("GRPO clip ratio", "share of tokens", [("clip_ratio/region_mean", "region"),
                                                              ("clip_ratio/low_mean", "low"),
                                                              ("clip_ratio/high_mean", "high")]),
    "distillation_loss": ("Distillation loss", "loss", [("hard_loss", "hard (CE)"), ("soft_loss", "soft (T^2 KL)")]),
}


def plot_files(run_dir: str | Path) -> list[str]:
    """The run's plots (absolute paths), as artifacts list them."""
    return sorted(str(p) for p in (Path(run_dir) / "plots").glob("*.png"))


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw every curve the run logged into RUN_DIR/plots/; returns the files written."""
    plt = pyplot()
    files = RunFiles(run_dir)
    records = files.read_metrics()
    out_dir = files.dir / "plots"
    written = []
    job = files.dir.name
    keys = sorted({k for r in records for k in r})
    for name, (title, ylabel, series) in PLOTS.items():
        series = [(k, label.replace("*", k.split("/")[1]) if "*" in key else label)
                  for key, label in series for k in (fnmatch.filter(keys, key) if "*" in key else [key])]
        lines = [(label, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r])
                 for key, label in series]
        lines = [(label, pts) for label, pts in lines if pts]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for label, pts in lines:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) <= 12 else None, markersize=3, label=label)
        ax.set(title=f"{title} ({job})", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        written.append(_save(fig, out_dir / f"{name}.png"))
        plt.close(fig)
    ranks = files.rank_reports()
    if ranks and any("total_params" in r for r in ranks):
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
        ids = [r["rank"] for r in ranks]
        a.bar(ids, [100 * r.get("local_params", 0) / max(1, r.get("total_params", 1)) for r in ranks])
        a.set(title="Parameters held per rank", xlabel="rank", ylabel="% of parameters", xticks=ids)
        b.bar(ids, [r.get("peak_device_memory_mb") or r.get("peak_host_memory_mb", 0) for r in ranks])
        b.set(title="Peak memory per rank", xlabel="rank", ylabel="MB", xticks=ids)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "ranks.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)  # readers (artifacts, the dashboard) never see half a file
    return path


def write_plots_quietly(run_dir: str | Path) -> None:
    """write_plots for the end of a run: a plotting problem is logged, never fails the job."""
    import logging

    try:
        write_plots(run_dir)
    except Exception as e:  # noqa: BLE001 - the plots are a convenience; the trained model is what counts
        logging.getLogger("providers.training").warning("could not write plots: %s: %s", type(e).__name__, e)


if __name__ == "__main__":
    for p in write_plots(sys.argv[1]):
        print(json.dumps(str(p)))
