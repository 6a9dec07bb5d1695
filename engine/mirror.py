"""`[log] report_to`: mirror a run's metrics to the dashboards people already use, as HF Trainer's
`report_to` does; the run directory stays the source of truth (a mirror that fails is switched off with one
line on stderr, never the run).

Names follow TRL's online trainers as seen through HF Trainer's callbacks: training metrics get the `train/`
prefix (`train/objective/kl`, `train/objective/rlhf_reward`, `train/policy/clipfrac_avg`,
`train/loss/policy_avg`, `train/lr`), evaluation metrics keep `eval/` (`eval/gold`), the step is the
run's global step. zopro's own metrics (`zo/...`, `interplay/...`, `loss/sft`) keep their names under
`train/`.

- tensorboard: event files in RUN_DIR/tensorboard/ (`tensorboard --logdir runs/` shows every run); needs
  the `tensorboard` package (`pip install -e ".[tensorboard]"`).
- wandb: offline (no network, no account): RUN_DIR/wandb/, `wandb sync` uploads it later; needs `wandb`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TRL_NAMES = {  # ours -> TRL's (RLOOTrainer, PPOTrainer, OnlineDPOTrainer)
    "policy/clipfrac": "policy/clipfrac_avg",
    "policy/approxkl": "policy/approxkl_avg",
    "loss/policy": "loss/policy_avg",
    "policy/lr": "lr",
}


def trl_name(name: str) -> str:
    """The name a TRL trainer's metric has in TensorBoard / W&B: `eval/...` as it is, `train/...` for the
    rest (also the counters, time and memory that ride along in an evaluation's event)."""
    if name.startswith("eval/"):
        return name
    return "train/" + TRL_NAMES.get(name, name)


def missing_package(targets: list[str]) -> str | None:
    """One sentence when a target's package is not installed (checked before the run directory is made)."""
    for target in targets:
        package = PACKAGES.get(target)
        if package and importlib.util.find_spec(package) is None:
            return (
                f"log.report_to names {target}, but the {package} package is not installed; "
                f'install it with `pip install -e ".[{target}]"` (or `pip install {package}`), or drop {target!r} '
                "from log.report_to"
            )
    return None


class Mirror:
    """Receives every event of a run (the runner's listener) and writes its metrics to each target."""

    def __init__(self, targets: list[str], run_dir: Path, config: dict | None = None, err=None):
        self.targets = list(dict.fromkeys(targets))
        self.run_dir = Path(run_dir)
        self.config = config or {}
        self.err = err
        self._tb: Any = None
        self._wandb: Any = None
        self._broken: set[str] = set()

    def on_event(self, event: dict) -> None:
        if not self.targets:
            return
        kind = event.get("type")
        if (
            kind == "resume"
        ):  # the resumed run re-emits from its checkpoint: drop what the mirrors hold after it
            self._open(purge_step=int(event.get("global_step") or 0))
            return
        if kind not in ("metrics", "eval"):
            return
        step = int(event.get("global_step") or 0)
        scalars = {
            trl_name(name): float(value)
            for name, value in (event.get("metrics") or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if not scalars:
            return
        self._open()
        for target in self.targets:
            if target in self._broken:
                continue
            try:
                if target == "tensorboard" and self._tb is not None:
                    for name, value in scalars.items():
                        self._tb.add_scalar(name, value, step, walltime=event.get("time"))
                elif target == "wandb" and self._wandb is not None:
                    self._wandb.log({**scalars, "train/global_step": step}, step=step)
            except Exception as error:  # noqa: BLE001 - a mirror never stops training
                self._give_up(target, error)

    def _open(self, purge_step: int | None = None) -> None:
        if "tensorboard" in self.targets and "tensorboard" not in self._broken and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step, flush_secs=10
                )
                self._tb.add_text("zopro/recipe", f"```\n{self.config.get('recipe_text', '')}\n```", 0)
            except Exception as error:  # noqa: BLE001
                self._give_up("tensorboard", error)
        if "wandb" in self.targets and "wandb" not in self._broken and self._wandb is None:
            try:
                import wandb

                self._wandb = wandb.init(
                    mode="offline",
                    dir=str(self.run_dir),
                    project=self.config.get("project", "zopro"),
                    name=self.run_dir.name,
                    id=self.run_dir.name.replace("/", "-")[:64],
                    resume="allow",
                    config=self.config.get("recipe", {}),
                    # a new W&B run object per run (wandb >= 0.19 names it; older ones take True), and no
                    # console capture or banner of wandb's own: the run's output stays zopro's
                    reinit="create_new" if _version(wandb.__version__) >= (0, 19) else True,
                    settings=wandb.Settings(silent=True, console="off"),
                )
            except Exception as error:  # noqa: BLE001
                self._give_up("wandb", error)

    def _give_up(self, target: str, error: BaseException) -> None:
        self._broken.add(target)
        if self.err is not None:
            from rich.markup import escape

            self.err.print(
                f"[yellow]report_to {target} is off for this run: {escape(f'{type(error).__name__}: {error}')}[/]",
                soft_wrap=True,
            )

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:  # noqa: BLE001
                pass
            self._tb = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self._wandb = None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
