"""The objectives figure of benchmarks/RESULTS.md ("Objectives on the demo"): per cell of
`benchmarks/results/objectives_demo/<cell>/transfer.csv`, the fine-tuned student's transfer and its difference from
the placebo (95 % CIs) on in-sample, new contexts and new games, and the association with the teacher's choices of
the student and of its placebo. Reads only the committed tables.

    .venv/bin/python -m benchmarks.plot_objectives [--out benchmarks/results/objectives_demo/objectives.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent / "results" / "objectives_demo"
CELLS = {"sft-k4": "sft (paper)", "sft+distribution-k4": "sft+distribution", "distribution-6ep-lr2e-3": "distribution"}
FAMILIES = {"in_sample": "in-sample", "oos_context": "new contexts", "oos_game": "new games"}


def load(root: Path = ROOT) -> pd.DataFrame:
    frames = []
    for cell, label in CELLS.items():
        df = pd.read_csv(root / cell / "transfer.csv")
        df = df[(df["group"] == "all") & df["family"].isin(list(FAMILIES))]
        frames.append(df.assign(cell=label))
    return pd.concat(frames, ignore_index=True)


def plot(df: pd.DataFrame, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.26
    panels = [("transfer", "transfer_ci_low", "transfer_ci_high", "student_finetuned", "transfer, % of the gap"),
              ("placebo_difference", "placebo_ci_low", "placebo_ci_high", "student_finetuned",
               "transfer minus placebo, points")]
    for ax, (col, lo, hi, role, title) in zip(axes[:2], panels):
        for i, label in enumerate(CELLS.values()):
            d = df[(df["cell"] == label) & (df["role"] == role)].set_index("family").loc[list(FAMILIES)]
            x = [j + (i - 1) * width for j in range(len(FAMILIES))]
            ax.bar(x, d[col], width, label=label)
            ax.errorbar(x, d[col], yerr=[d[col] - d[lo], d[hi] - d[col]], fmt="none", ecolor="black", capsize=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(FAMILIES)), list(FAMILIES.values()))
        ax.set_title(title)
    ax = axes[2]
    for i, label in enumerate(CELLS.values()):
        d = df[(df["cell"] == label) & (df["family"] == "in_sample")].set_index("role")
        ax.bar([i - width / 2], [d.loc["student_finetuned", "association"]], width, color=f"C{i}")
        ax.bar([i + width / 2], [d.loc["student_placebo", "association"]], width, color=f"C{i}", alpha=0.4)
    ax.axhline(-0.87, color="black", ls="--", lw=0.8, label="base (-0.87)")
    ax.set_xticks(range(len(CELLS)), list(CELLS.values()))
    ax.set_title("association r, in-sample (light: placebo)")
    ax.legend(loc="lower left", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Objectives on the demo pair (Qwen2.5-Coder-0.5B -> SmolLM2-135M, k = 4), each cell with its placebo")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "objectives.png")
    args = ap.parse_args()
    plot(load(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
