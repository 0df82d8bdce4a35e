"""Visual tools: a record file over time, one step's gradients, activation maximization.

    gradmon.viz.plot_record("run.jsonl", "report.png")    # `gradmon plot run.jsonl -o report.png`
    gradmon.viz.plot_gradients(model, "grads.png")         # after backward(), or a Snapshot
    x = gradmon.viz.maximize_activation(model, "features.3", unit=5, input_shape=(1, 3, 32, 32))

matplotlib is an extra (`pip install gradmon[viz]`), imported when a plot is drawn. The
figures are drawn with matplotlib's object API on its Agg canvas (no pyplot), so they
need no display and leave the backend of an interactive session alone.
"""

from gradmon.viz.activation import maximize_activation, plot_inputs
from gradmon.viz.gradients import plot_gradients
from gradmon.viz.record import ANOMALY_COLORS as ANOMALY_COLORS  # as before the split
from gradmon.viz.record import plot_record

__all__ = ["maximize_activation", "plot_gradients", "plot_inputs", "plot_record"]
