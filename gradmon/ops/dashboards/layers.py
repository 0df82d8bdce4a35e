"""`gradmon-layers`: log10 gradient norm as a layers x time heatmap, top/bottom layers,
zero ratio, NaN/Inf layers, parameter norm, update ratio; and a collapsed row of
activation statistics (`collect.activations`) by module.

Activation series name a module in their `layer` label (`encoder.layers.0.linear1`), not a
layer of the gradient families (`...linear1.weight` by default), so they are narrowed by a
`module` variable of their own.
"""

from __future__ import annotations

from gradmon.export import schema
from gradmon.ops.dashboards.builders import (
    LAYER_SEL,
    MODULE_SEL,
    RATE,
    dash_m,
    dashboard,
    heatmap_b,
    heatmap_m,
    panel,
    series,
)

__all__ = ["layers"]


def layers() -> dash_m.Dashboard:
    def by_layer(metric: str) -> str:
        # One series per layer: the largest over the selected ranks (DDP ranks hold the
        # same gradient; pick one rank to see a single FSDP shard).
        return f"max by (layer) ({metric}{{{LAYER_SEL}}})"

    def by_module(metric: str, agg: str = "max") -> str:
        # One series per module. Ranks see different batches: pick one rank to see its own.
        return f"{agg} by (layer) ({metric}{{{MODULE_SEL}}})"

    opt_in = "Empty unless the agent runs with collect.activations: true."
    heat = panel(
        heatmap_b.Panel(),
        "log10 grad norm, layers x time",
        "log10 of each layer's gradient L2 norm (one row per layer, the largest over the "
        "selected ranks). Blue: vanishing, red: exploding. Layers whose gradient is all "
        "zero (dead) are left blank.",
        [(f"log10({by_layer(schema.GRAD_NORM.series)} > 0)", "{{layer}}")],
        unit="none",
        w=24,
        h=14,
    )
    heat.calculate(False).filter_values(heatmap_b.FilterValueRange())  # keep negative logs
    heat.color(
        heatmap_b.HeatmapColorOptions()
        .mode(heatmap_m.HeatmapColorMode.SCHEME)
        .scheme("Spectral")
        .reverse(True)
        .fill("dark-orange")
        .scale(heatmap_m.HeatmapColorScale.LINEAR)
        .exponent(0.5)
        .steps(64)
    ).y_axis(heatmap_b.YAxisConfig().unit("none")).cell_gap(0)

    return dashboard(
        "gradmon-layers",
        "gradmon / Layers",
        "Per-layer gradient statistics exported by gradmon: norm heatmap, extreme layers, "
        "zero ratio, NaN/Inf layers, parameter norm and update ratio; activation statistics "
        "by module (collect.activations) in a collapsed row. Narrow with $layer and $module.",
        [
            ("Layers x time", [heat]),
            (
                "Extremes",
                [
                    series(
                        "Top 10 layers by grad norm",
                        "The 10 layers with the largest gradient L2 norm at each point in "
                        "time (log scale): candidates for exploding gradients.",
                        [(f"topk(10, {by_layer(schema.GRAD_NORM.series)})", "{{layer}}")],
                        log=10,
                    ),
                    series(
                        "Bottom 10 layers by grad rms",
                        "The 10 layers with the smallest gradient rms (norm / sqrt(numel)) "
                        "at each point in time (log scale): candidates for vanishing "
                        "gradients.",
                        [(f"bottomk(10, {by_layer(schema.GRAD_RMS.series)})", "{{layer}}")],
                        log=10,
                    ),
                    series(
                        "Top 10 layers by zero ratio",
                        "Fraction of exactly-zero gradient entries; 100% for a layer that "
                        "got no gradient (dead, or frozen without requires_grad=False).",
                        [
                            (
                                f"topk(10, {by_layer(schema.GRAD_ZERO_RATIO.series)})",
                                "{{layer}}",
                            )
                        ],
                        unit="percentunit",
                        max_value=1,
                    ),
                    series(
                        "Layers with NaN/Inf gradients",
                        "Collected steps per rate window in which the layer's gradient had "
                        "NaN/Inf entries (only such layers): the earliest layer points at "
                        "the source.",
                        [
                            (
                                f"max by (layer) (increase({schema.LAYER_NONFINITE_STEPS.series}"
                                f"{{{LAYER_SEL}}}[{RATE}])) > 0",
                                "{{layer}}",
                            )
                        ],
                        bars=True,
                    ),
                ],
            ),
            (
                "Parameters",
                [
                    series(
                        "Parameter norm",
                        "L2 norm of each selected layer's parameter (log scale).",
                        [(by_layer(schema.PARAM_NORM.series), "{{layer}}")],
                        log=10,
                    ),
                    series(
                        "Update ratio",
                        "||dw|| / ||w|| of the last sampled step per layer (log scale); "
                        "around 1e-3 is typical for Adam. Empty unless the agent runs with "
                        "collect.update_ratio_every > 0.",
                        [(by_layer(schema.UPDATE_RATIO.series), "{{layer}}")],
                        log=10,
                    ),
                    series(
                        "Top 10 layers by grad norm, combined over ranks",
                        "sqrt of the sum over ranks of each layer's sum of squares "
                        "(recording rule gradmon:layer_grad_norm:combined): the exact norm "
                        "under every layout, since each distinct shard is exported by one "
                        "rank and replicas by none (DDP, FSDP, HSDP, tensor and pipeline "
                        "parallelism). Needs gradmon's recording rules in Prometheus; "
                        "ignores the instance and rank selection.",
                        [
                            (
                                'topk(10, gradmon:layer_grad_norm:combined{job=~"$job", '
                                'layer=~"$layer"})',
                                "{{layer}}",
                            )
                        ],
                        log=10,
                    ),
                    series(
                        "Top 10 layers by largest gradient entry",
                        "The largest absolute finite gradient entry per layer (log scale).",
                        [(f"topk(10, {by_layer(schema.GRAD_ABS_MAX.series)})", "{{layer}}")],
                        log=10,
                    ),
                ],
            ),
        ],
        collapsed=[
            (
                "Activations (collect.activations)",
                [
                    series(
                        "Activation rms by module",
                        "RMS of each selected module's forward output over the forwards "
                        "before the latest collected step (log scale; the largest over the "
                        "selected ranks). Activations that collapse or blow up often show here "
                        f"before the gradients do. {opt_in}",
                        [(by_module(schema.ACTIVATION_RMS.series), "{{layer}}")],
                        log=10,
                    ),
                    series(
                        "Top 10 modules by activation zero ratio",
                        "Fraction of exactly-zero entries of the module's forward output (the "
                        "largest over the selected ranks): near 100% after a ReLU means dead "
                        f"units. {opt_in}",
                        [
                            (
                                f"topk(10, {by_module(schema.ACTIVATION_ZERO_RATIO.series)})",
                                "{{layer}}",
                            )
                        ],
                        unit="percentunit",
                        max_value=1,
                    ),
                    series(
                        "Activation mean by module",
                        "Mean of the finite entries of each selected module's forward output "
                        "(averaged over the selected ranks); a drift away from 0 after a "
                        f"normalization layer is a warning sign. {opt_in}",
                        [(by_module(schema.ACTIVATION_MEAN.series, "avg"), "{{layer}}")],
                    ),
                    series(
                        "Modules with NaN/Inf activations",
                        "Collected steps per rate window in which the module's forward output "
                        "had NaN/Inf entries (only such modules): the first module in model "
                        f"order is where they appear. {opt_in}",
                        [
                            (
                                f"max by (layer) (increase({schema.ACTIVATION_NONFINITE.series}"
                                f"{{{MODULE_SEL}}}[{RATE}])) > 0",
                                "{{layer}}",
                            )
                        ],
                        bars=True,
                    ),
                ],
            )
        ],
        modules=True,
    )
