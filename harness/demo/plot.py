"""``savings.png``: cumulative cost (actual, all-teacher); savings net of training on a scale
of their own, with the break-even request marked; student share and quality per phase. The
promotions are marked on each."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mark_promotions(axis: Any, result: dict[str, Any]) -> None:
    for position, request in enumerate(result["loop"]["promoted_after_request"]):
        axis.axvline(request, color="green", linestyle="--", linewidth=0.9,
                     label="promotion" if position == 0 else None)
    _mark_shift(axis, result.get("shift"))


def _mark_shift(axis: Any, shift: dict[str, Any] | None) -> None:
    """The shift phase: where the held-back intents joined, and each drift-started cycle."""
    if shift is None:
        return
    axis.axvline(shift["at_request"], color="tab:brown", linewidth=1.6,
                 label=f"shift: {len(shift['held_back_intents'])} new intents join")
    for position, cycle in enumerate(shift["drift_retrains"]):
        axis.axvline(cycle["after_request"], color="crimson", linestyle=":", linewidth=1.4,
                     label="drift starts a retrain" if position == 0 else None)


def _shift_title(shift: dict[str, Any] | None) -> str:
    """The new intents' student share and accuracy before vs after the version drift brought."""
    if shift is None:
        return ""
    before, after, version = shift["new_intents_before"], shift["new_intents_after"], shift["version_after_drift"]
    if after is None or version is None:
        return "new intents: no version promoted after a drift-started retrain"
    return (f"new intents before {version['version']}: student share {before['student_share'] or 0:.0%}, "
            f"accuracy {before['accuracy'] or 0:.0%}; after: {after['student_share'] or 0:.0%}, "
            f"{after['accuracy'] or 0:.0%}")


def _runs(count: int) -> str:
    return f"{count} training run" + ("" if count == 1 else "s")


def _cost_panel(axis: Any, result: dict[str, Any]) -> None:
    series = result["savings"]["series"]
    axis.plot(series["request"], series["all_teacher_cost_usd"], label="all-teacher cost")
    axis.plot(series["request"], series["actual_cost_usd"], label="actual cost (teacher + student + shadow)")
    _mark_promotions(axis, result)
    axis.set_ylabel("cumulative USD")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title("distillgate demo on CLINC150 (teacher: replay stand-in)")


def _net_panel(axis: Any, result: dict[str, Any]) -> None:
    """Net savings on a scale of their own: early on they are a few cents beside dollars."""
    savings = result["savings"]
    series = savings["series"]
    axis.plot(series["request"], series["net_savings_usd"], linewidth=2.0, color="tab:red",
              label="net savings (all-teacher - actual - training)")
    axis.plot(series["request"], series["training_cost_usd"], linestyle=":", color="tab:purple",
              label="training compute")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    _mark_promotions(axis, result)
    break_even = savings["break_even_request"]
    if break_even is not None:
        axis.axvline(break_even, color="black", linewidth=1.2, label=f"break-even: request {break_even:,}")
    else:
        axis.text(0.99, 0.95, "no break-even within the stream", transform=axis.transAxes, ha="right", va="top",
                  fontsize=9)
    axis.set_ylabel("cumulative USD")
    axis.legend(loc="upper left", fontsize=8)
    net = savings["net_savings_usd"] or 0.0
    axis.set_title(f"net savings {net:,.4f} USD after {savings['training_cost_usd']:,.4f} USD of training "
                   f"({_runs(len(savings['training']['runs']))})", fontsize=10)


def _share_panel(axis: Any, phases: list[dict[str, Any]], shift: dict[str, Any] | None = None) -> None:
    x = [phase["first_request"] + phase["requests"] - 1 for phase in phases]
    axis.plot(x, [phase["in_scope_student_share"] or 0 for phase in phases], marker="o",
              label="student share of in-scope")
    axis.plot(x, [phase["in_scope_accuracy"] or 0 for phase in phases], marker="s", label="served in-scope accuracy")
    axis.plot(x, [phase["all_teacher_in_scope_accuracy"] or 0 for phase in phases], linestyle="--",
              label="all-teacher in-scope accuracy")
    axis.plot(x, [phase["oos_sent_to_teacher"] or 0 for phase in phases], marker="^", label="OOS sent to teacher")
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("requests")
    if shift is not None:
        _mark_shift(axis, shift)
        axis.set_title(_shift_title(shift), fontsize=10)
    axis.legend(loc="lower right", fontsize=8)


def plot_savings(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cost_axis, net_axis, share_axis) = plt.subplots(
        3, 1, figsize=(10, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    _cost_panel(cost_axis, result)
    _net_panel(net_axis, result)
    _share_panel(share_axis, result["phases"], result.get("shift"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
