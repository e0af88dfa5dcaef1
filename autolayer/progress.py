"""Live progress of a search in the terminal (rich): a bar over trials and one line per event."""

from __future__ import annotations

from types import TracebackType

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from autolayer.config import Config
from autolayer.search import SearchHooks
from autolayer.spaces import Candidate
from autolayer.study import TrialRecord


class SearchDisplay:
    """Shows which trial runs, its held-out score as it trains, and each trial's outcome."""

    def __init__(self, console: Console, config: Config) -> None:
        self.console = console
        self.config = config
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} trials"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.bar = self.progress.add_task("preparing", total=config.search.n_trials)

    def __enter__(self) -> SearchDisplay:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def hooks(self) -> SearchHooks:
        return SearchHooks(
            on_message=self.message,
            on_trial_start=self.trial_start,
            on_eval=self.evaluated,
            on_trial_end=self.trial_end,
            on_total=self.set_total,
            on_more=self.more,
        )

    def set_total(self, total: int | None) -> None:
        self.progress.update(self.bar, total=total)

    def more(self, count: int) -> None:
        """Baselines and racing add trials after the search's own: extend the bar."""
        task = self.progress.tasks[self.bar]
        self.progress.update(self.bar, total=max(task.total or 0, task.completed) + count)

    def message(self, text: str) -> None:
        self.console.log(text)
        self.progress.update(self.bar, description=text[:60])

    def trial_start(self, number: int, candidate: Candidate) -> None:
        lr = f" lr {candidate.lr:.2g}" if candidate.lr is not None else ""
        self.progress.update(
            self.bar, description=f"trial {number}: layers {_label(candidate.layers)}{lr}"
        )

    def evaluated(self, number: int, step: int, score: float) -> None:
        self.progress.update(
            self.bar,
            description=f"trial {number}: step {step}/{self.config.proxy.steps}, "
            f"held-out score {score:.3f}",
        )

    def trial_end(self, trial: FrozenTrial) -> None:
        r = TrialRecord.of(trial)
        layers = _label(r.layers)
        if trial.state.name == "COMPLETE" and r.score is not None:
            c_text = (
                "C undefined"
                if r.contribution is None
                else f"C {r.contribution:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"
                + ("" if r.ci_seed_df else " (prompt noise only)")
            )
            text = (
                f"trial {trial.number} layers {layers}: score {r.score:.3f}, {c_text} "
                f"({r.seconds or 0:.0f}s)"
            )
        else:
            reason = r.fail_reason or r.prune_reason or ("infeasible" if r.infeasible else "")
            state = trial.state.name.lower()
            text = f"trial {trial.number} layers {layers}: {state} {reason}".rstrip()
        self.console.log(text)
        self.progress.advance(self.bar)


def _label(layers: tuple[int, ...]) -> str:
    return ",".join(map(str, layers)) if layers else "-"
