"""``savings.png``: cumulative cost (actual, all-teacher) and savings net of training, with
the break-even request and the promotions marked; student share and quality per phase below."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cost_panel(axis: Any, result: dict[str, Any]) -> None:
    savings = result["savings"]
    series = savings["series"]
    x = series["request"]
    axis.plot(x, series["all_teacher_cost_usd"], label="all-teacher cost")
    axis.plot(x, series["actual_cost_usd"], label="actual cost (teacher + student + shadow)")
    axis.plot(x, series["training_cost_usd"], linestyle=":", label="training compute")
    axis.plot(x, series["net_savings_usd"], linewidth=2.2, label="net savings (all-teacher - actual - training)")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    for position, request in enumerate(result["loop"]["promoted_after_request"]):
        axis.axvline(request, color="green", linestyle="--", linewidth=0.9,
                     label="promotion" if position == 0 else None)
    break_even = savings["break_even_request"]
    if break_even is not None:
        axis.axvline(break_even, color="black", linewidth=1.2)
        axis.annotate(f"break-even: request {break_even:,}", xy=(break_even, 0.0), xytext=(6, 12),
                      textcoords="offset points", fontsize=9)
    else:
        axis.text(0.01, 0.97, "no break-even within the stream", transform=axis.transAxes, va="top", fontsize=9)
    axis.set_ylabel("cumulative $")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(f"distillgate demo on CLINC150 (teacher: replay stand-in); net savings "
                   f"${savings['net_savings_usd'] or 0:,.4f}, training ${savings['training_cost_usd']:,.4f}")


def _share_panel(axis: Any, phases: list[dict[str, Any]]) -> None:
    x = [phase["first_request"] + phase["requests"] - 1 for phase in phases]
    axis.plot(x, [phase["in_scope_student_share"] or 0 for phase in phases], marker="o",
              label="student share of in-scope")
    axis.plot(x, [phase["in_scope_accuracy"] or 0 for phase in phases], marker="s", label="served in-scope accuracy")
    axis.plot(x, [phase["all_teacher_in_scope_accuracy"] or 0 for phase in phases], linestyle="--",
              label="all-teacher in-scope accuracy")
    axis.plot(x, [phase["oos_sent_to_teacher"] or 0 for phase in phases], marker="^", label="OOS sent to teacher")
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("requests")
    axis.legend(loc="lower right", fontsize=8)


def plot_savings(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cost_axis, share_axis) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    _cost_panel(cost_axis, result)
    _share_panel(share_axis, result["phases"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
