"""Trainer integrations: callbacks that attach gradmon to a trainer's model and optimizer.

- `gradmon.integrations.lightning.GradmonCallback`: a Lightning `Callback`
  (`pip install 'gradmon[lightning]'`; `lightning` or `pytorch_lightning`).
- `gradmon.integrations.transformers.GradmonCallback`: a Hugging Face `TrainerCallback`
  (`pip install 'gradmon[transformers]'`).

Each submodule imports its trainer package when it is imported, never before: importing
gradmon or this package needs neither.
"""

from __future__ import annotations

__all__ = ["lightning", "transformers"]
