"""``savings.png``: cost and student share over the stream, quality alongside."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_savings(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    x = [phase["first_request"] + phase["requests"] - 1 for phase in phases]
    cumulative_cost, cumulative_teacher = [], []
    for phase in phases:
        cumulative_cost.append((cumulative_cost[-1] if cumulative_cost else 0.0) + phase["cost_usd"])
        cumulative_teacher.append((cumulative_teacher[-1] if cumulative_teacher else 0.0) + phase["all_teacher_cost_usd"])
    figure, (cost_axis, share_axis) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    cost_axis.plot(x, cumulative_teacher, marker="o", label="all-teacher")
    cost_axis.plot(x, cumulative_cost, marker="o", label="distillgate")
    cost_axis.set_ylabel("cumulative cost ($)")
    cost_axis.legend()
    cost_axis.set_title("distillgate demo on CLINC150 (teacher: replay stand-in)")
    share_axis.plot(x, [phase["student_share"] or 0 for phase in phases], marker="o", label="student share")
    share_axis.plot(x, [phase["in_scope_accuracy"] or 0 for phase in phases], marker="s", label="served in-scope accuracy")
    share_axis.plot(x, [phase["all_teacher_in_scope_accuracy"] or 0 for phase in phases], linestyle="--",
                    label="all-teacher in-scope accuracy")
    share_axis.plot(x, [phase["oos_sent_to_teacher"] or 0 for phase in phases], marker="^", label="OOS sent to teacher")
    share_axis.set_ylim(0, 1.05)
    share_axis.set_xlabel("requests")
    share_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
