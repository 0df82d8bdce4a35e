"""Trainer integrations: real short Lightning `fit()` and Hugging Face `Trainer.train()` runs
on the CPU with the agent attached by the callbacks (skipped where a package is missing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradmon
from gradmon import Monitor
from gradmon.stats import Col, reference

NO_EXPORTER: dict[str, Any] = {"exporter": {"enabled": False}}


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def _steps_total(mon: Monitor) -> float | None:
    return mon.registry.get_sample_value("gradmon_steps_total")


def _collections_total(mon: Monitor) -> float | None:
    return mon.registry.get_sample_value("gradmon_collections_total")


# ----------------------------------------------------------------- Lightning
def test_lightning_fit_attaches_collects_and_closes(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradmon.integrations.lightning import GradmonCallback

    class Tiny(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
            return out

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            return {"loss": nn.functional.mse_loss(self(x), y)}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    seen: dict[str, Any] = {}

    class Capturing(GradmonCallback):
        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            assert self.monitor is not None and not self.monitor.closed
            seen["steps"] = _steps_total(self.monitor)
            seen["collections"] = _collections_total(self.monitor)
            seen["loss"] = self.monitor.registry.get_sample_value(
                "gradmon_scalar", {"name": "loss"}
            )
            # The last step's grads are still on the parameters: the snapshot must be of
            # them (collected after the closure's backward, not before it).
            seen["grad_norm"] = _grad_norm(pl_module)
            super().on_fit_end(trainer, pl_module)

    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    callback = Capturing(config=NO_EXPORTER)
    trainer = _trainer(pl, tmp_path, callback, max_steps=5)
    trainer.fit(Tiny(), loader)

    mon = callback.monitor
    assert mon is not None
    assert mon.port is None  # exporter disabled
    assert mon.closed
    assert trainer.global_step == 5
    assert seen["steps"] == trainer.global_step
    assert seen["collections"] == trainer.global_step
    assert seen["loss"] is not None and math.isfinite(seen["loss"])
    snap = mon.snapshot()
    assert snap is not None
    assert snap.step == trainer.global_step - 1
    assert set(snap.layers) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert snap.global_norm == pytest.approx(seen["grad_norm"], rel=1e-4)


def _trainer(pl: Any, tmp_path: Path, callback: Any, max_steps: int, scaler: Any = None) -> Any:
    """A quiet CPU Lightning Trainer with `callback`; fp16 mixed precision with `scaler`."""
    plugins = []
    if scaler is not None:
        from lightning.pytorch.plugins import MixedPrecision

        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
        plugins=plugins,
    )


def test_lightning_callback_closes_on_exception(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradmon.integrations.lightning import GradmonCallback

    class Failing(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                raise RuntimeError("boom")
            loss: torch.Tensor = self.fc(batch[0]).pow(2).mean()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    callback = GradmonCallback(config=NO_EXPORTER)
    trainer = _trainer(pl, tmp_path, callback, max_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.monitor is not None and callback.monitor.closed
    snap = callback.monitor.snapshot()
    assert snap is not None and snap.step == 1


def test_lightning_amp_scaler_attached_and_skips_counted(tmp_path: Any) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    from gradmon.integrations.lightning import GradmonCallback

    class Overflowing(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            loss = self.fc(batch[0]).pow(2).mean()
            return {"loss": loss * math.inf if batch_idx == 2 else loss}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    seen: dict[str, Any] = {}

    class Capturing(GradmonCallback):
        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            assert self.monitor is not None
            for name in ("steps", "skipped_steps", "collections"):
                seen[name] = self.monitor.registry.get_sample_value(f"gradmon_{name}_total")
            seen["scale"] = self.monitor.registry.get_sample_value("gradmon_loss_scale")
            super().on_fit_end(trainer, pl_module)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    callback = Capturing(config=NO_EXPORTER)
    trainer = _trainer(pl, tmp_path, callback, max_steps=5, scaler=scaler)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    trainer.fit(Overflowing(), torch.utils.data.DataLoader(data, batch_size=8))

    assert callback.monitor is not None and callback.monitor.closed
    assert seen["scale"] == scaler.get_scale()
    # Every skip halves the scale (no growth in 5 steps): the agent counted each one.
    halvings = round(math.log2(2.0**16 / scaler.get_scale()))
    assert halvings >= 1
    assert seen["skipped_steps"] == halvings
    assert seen["steps"] == seen["collections"] == trainer.global_step == 5


# -------------------------------------------------------------- transformers
class RegressionData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """64 random (x, labels) pairs, as the Hugging Face Trainer takes them."""

    def __init__(self) -> None:
        self.x = torch.randn(64, 8)
        self.y = torch.randn(64, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_transformers_train_attaches_collects_and_closes(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    from gradmon.integrations.transformers import GradmonCallback

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 1)

        def forward(
            self, x: torch.Tensor, labels: torch.Tensor | None = None
        ) -> dict[str, torch.Tensor]:
            out = self.fc2(torch.relu(self.fc1(x)))
            result = {"logits": out}
            if labels is not None:
                result["loss"] = nn.functional.mse_loss(out, labels)
            return result

    seen: dict[str, Any] = {"grad_norms": []}

    class Capturing(GradmonCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After optimizer.step(), before zero_grad(): the grads the agent saw.
            seen["grad_norms"].append(_grad_norm(kwargs["model"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            assert self.monitor is not None and not self.monitor.closed
            seen["steps"] = _steps_total(self.monitor)
            seen["collections"] = _collections_total(self.monitor)
            seen["loss"] = self.monitor.registry.get_sample_value(
                "gradmon_scalar", {"name": "loss"}
            )
            super().on_train_end(args, state, control, **kwargs)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    callback = Capturing(config=NO_EXPORTER)
    model = Tiny()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RegressionData(), callbacks=[callback]
    )
    trainer.train()

    mon = callback.monitor
    assert mon is not None
    assert mon.port is None
    assert mon.closed
    assert trainer.state.global_step == 3
    assert seen["steps"] == 3
    assert seen["collections"] == 3
    assert seen["loss"] is not None and math.isfinite(seen["loss"])
    snap = mon.snapshot()
    assert snap is not None
    assert snap.step == 2
    assert set(snap.layers) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert snap.global_norm == pytest.approx(seen["grad_norms"][-1], rel=1e-4)


def test_transformers_on_log_keeps_numbers_only() -> None:
    pytest.importorskip("transformers")
    from gradmon.integrations.transformers import GradmonCallback

    callback = GradmonCallback(config=NO_EXPORTER)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback.on_train_begin(None, None, None, model=model, optimizer=optimizer)
    mon = callback.monitor
    assert mon is not None
    callback.on_log(None, None, None, logs={"loss": 0.5, "epoch": 1, "flag": True, "msg": "x"})
    assert mon.registry.get_sample_value("gradmon_scalar", {"name": "loss"}) == 0.5
    assert mon.registry.get_sample_value("gradmon_scalar", {"name": "epoch"}) == 1.0
    assert mon.registry.get_sample_value("gradmon_scalar", {"name": "flag"}) is None
    assert mon.registry.get_sample_value("gradmon_scalar", {"name": "msg"}) is None
    callback.on_train_end(None, None, None)
    assert mon.closed


# ------------------------------------------------- fused optimizers under a GradScaler
def _unscaled_reference(model: nn.Module, scale: float) -> dict[str, list[float]]:
    """float64 partials of each parameter's unscaled gradient (grad / scale)."""
    return {
        n: reference.tensor_partials(p.grad.detach().double() / scale)
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _assert_unscaled(snap: gradmon.Snapshot, want: dict[str, list[float]]) -> None:
    assert set(snap.layers) == set(want)
    for name, row in want.items():
        got = snap.layers[name]
        assert (got.nan_count, got.inf_count) == (row[Col.NAN_COUNT], row[Col.INF_COUNT]), name
        assert got.sum_squares == pytest.approx(row[Col.SUM_SQ], rel=1e-6), name
        assert got.abs_max == pytest.approx(row[Col.ABS_MAX], rel=1e-6), name


def test_lightning_fused_optimizer_under_16_mixed_reports_unscaled_grads(tmp_path: Any) -> None:
    """Lightning leaves a fused optimizer's grads scaled (the kernel unscales them), and
    the skip is decided inside scaler.step(): the statistics must still be the unscaled
    grads' (no false `exploding`), and every skipped step counted."""
    pl = pytest.importorskip("lightning.pytorch")

    from gradmon.integrations.lightning import GradmonCallback

    class Fused(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss: torch.Tensor = self.fc2(torch.relu(self.fc1(batch[0]))).float().pow(2).mean()
            return loss * math.inf if batch_idx == 2 else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2, fused=True)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    seen: dict[str, Any] = {"want": [], "got": []}

    class Capturing(GradmonCallback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            # Scaled here (the fused kernel unscales): the reference divides by the scale.
            seen["want"].append(_unscaled_reference(pl_module, scaler.get_scale()))
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            super().on_train_batch_end(*args, **kwargs)
            assert self.monitor is not None
            seen["got"].append(self.monitor.snapshot())

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            assert self.monitor is not None
            for name in ("steps", "skipped_steps", "collections"):
                seen[name] = self.monitor.registry.get_sample_value(f"gradmon_{name}_total")
            seen["exploding"] = self.monitor.registry.get_sample_value(
                "gradmon_anomalies_total", {"layer": "fc1.weight", "kind": "exploding"}
            )
            super().on_fit_end(trainer, pl_module)

    callback = Capturing(config={**NO_EXPORTER, "health": {"exploding_norm": 100.0}})
    trainer = _trainer(pl, tmp_path, callback, max_steps=4, scaler=scaler)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    trainer.fit(Fused(), torch.utils.data.DataLoader(data, batch_size=8))

    assert len(seen["got"]) == len(seen["want"]) == trainer.global_step == 4
    for step, (snap, want) in enumerate(zip(seen["got"], seen["want"], strict=True)):
        assert snap is not None and snap.step == step
        _assert_unscaled(snap, want)
    assert seen["got"][2].skipped and seen["got"][2].nonfinite
    halvings = round(math.log2(2.0**8 / scaler.get_scale()))
    assert halvings >= 1
    assert seen["skipped_steps"] == halvings
    assert seen["steps"] == seen["collections"] == 4
    assert not seen["exploding"]  # the scaled grads (x256) would have been


def test_transformers_fused_adamw_under_a_grad_scaler_reports_unscaled_grads(
    tmp_path: Any,
) -> None:
    """optim="adamw_torch_fused" with an fp16 GradScaler, on the Trainer's own path
    (Accelerate's backward and AcceleratedOptimizer.step with the scaler). Accelerate
    refuses fp16 on a CPU, so the CPU GradScaler is handed to its accelerator and the
    model runs its forward under fp16 autocast: the nearest real path on a CPU."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradmon.integrations.transformers import GradmonCallback

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 1)
            self.calls = 0

        def forward(
            self, x: torch.Tensor, labels: torch.Tensor | None = None
        ) -> dict[str, torch.Tensor]:
            with torch.autocast("cpu", dtype=torch.float16):
                out = self.fc2(torch.relu(self.fc1(x))).float()
            result = {"logits": out}
            if labels is not None:
                loss = nn.functional.mse_loss(out, labels)
                self.calls += 1
                result["loss"] = loss * math.inf if self.calls == 2 else loss
            return result

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    seen: dict[str, Any] = {"want": [], "got": []}

    class Capturing(GradmonCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen["want"].append(_unscaled_reference(kw["model"], scaler.get_scale()))

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            assert self.monitor is not None
            seen["got"].append(self.monitor.snapshot())

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            assert self.monitor is not None
            for name in ("steps", "skipped_steps", "collections"):
                seen[name] = self.monitor.registry.get_sample_value(f"gradmon_{name}_total")
            super().on_train_end(args, state, control, **kw)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        optim="adamw_torch_fused",
        max_grad_norm=0.0,  # no clipping: the grads reach the fused kernel scaled
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    callback = Capturing(config=NO_EXPORTER)
    trainer = transformers.Trainer(
        model=Tiny(), args=args, train_dataset=RegressionData(), callbacks=[callback]
    )
    trainer.accelerator.scaler = scaler  # what Accelerator(mixed_precision="fp16") makes
    trainer.train()

    assert trainer.optimizer.optimizer.defaults["fused"]  # the fused kernel did step
    assert len(seen["got"]) == len(seen["want"]) == 4
    for step, (snap, want) in enumerate(zip(seen["got"], seen["want"], strict=True)):
        assert snap is not None and snap.step == step
        _assert_unscaled(snap, want)
    assert seen["got"][1].skipped and seen["got"][1].nonfinite
    halvings = round(math.log2(2.0**8 / scaler.get_scale()))
    assert halvings >= 1
    assert seen["skipped_steps"] == halvings
    assert seen["steps"] == seen["collections"] == 4
