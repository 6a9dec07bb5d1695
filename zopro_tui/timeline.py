"""The stage timeline of a run, from its stage_start and stage_end events: which stages are done (and how
long each took), which one runs now, which come next. Drawn in the dashboard's header."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text

from engine.rundir.events import drop_rewound
from engine.rundir.report import fmt_duration
from engine.rundir.wording import plural, short_iteration
from zopro_tui.series_parser import SeriesBatch

BEFORE_ITERATIONS = ("sft", "reward")
PER_ITERATION = ("policy", "refine", "eval")


@dataclass
class StageSpan:
    stage: str
    iteration: int | None
    seq: int
    started: float | None  # elapsed seconds at its start
    wall_s: float | None = None  # set by its stage_end


@dataclass
class StageTimeline:
    spans: list[StageSpan] = field(default_factory=list)

    def extend(self, batch: SeriesBatch) -> None:
        if batch.rewind_to_seq is not None:  # a resumed run re-emits what came after its checkpoint
            drop_rewound(self.spans, batch.rewind_to_seq, lambda span: span.seq)
        for event in batch.events:
            kind = event.get("type")
            if kind == "stage_start":
                self.spans.append(
                    StageSpan(
                        event.get("stage") or "?",
                        event.get("iteration"),
                        event.get("seq", -1),
                        event.get("elapsed"),
                    )
                )
            elif kind == "stage_end" and self.spans and self.spans[-1].stage == event.get("stage"):
                wall = event.get("wall_s")  # the stage's working time: its pauses are shown apart
                self.spans[-1].wall_s = (
                    None if wall is None else max(0.0, wall - (event.get("paused_s") or 0.0))
                )

    def current(self) -> StageSpan | None:
        return self.spans[-1] if self.spans else None

    def render(
        self, iterations: int | None, finished: bool = False, now_elapsed: float | None = None
    ) -> Text:
        """`sft 0:12 ✓ reward 0:08 ✓ │ it 2/4 policy 0:30 ✓ refine ▸ eval`: done stages with their wall time,
        the running one marked, the rest of the current iteration dim."""
        text = Text(no_wrap=True, overflow="ellipsis")
        if not self.spans:
            return text
        last = self.spans[-1]
        done_mark = "✓"

        def part(span: StageSpan | None, stage: str) -> None:
            if text.cell_len:
                text.append(" ")
            if span is None:
                text.append(stage, style="dim")
                return
            running = span is last and span.wall_s is None and not finished
            if running:
                text.append(f"{stage} ▸", style="bold cyan")
                if now_elapsed is not None and span.started is not None:
                    text.append(f" {fmt_duration(max(0.0, now_elapsed - span.started))}", style="cyan")
            else:
                text.append(
                    f"{stage} {fmt_duration(span.wall_s)} {done_mark}" if span.wall_s is not None else stage
                )

        first = {span.stage: span for span in self.spans if span.iteration is None}
        for stage in BEFORE_ITERATIONS:
            part(first.get(stage), stage)
        iteration = max((s.iteration for s in self.spans if s.iteration is not None), default=None)
        if iteration is None:
            if iterations:
                text.append(f" │ {plural(iterations, 'iteration')}", style="dim")
            return text
        text.append(f" │ {short_iteration(iteration, iterations)}")
        spans = {span.stage: span for span in self.spans if span.iteration == iteration}
        for stage in PER_ITERATION:
            part(spans.get(stage), stage)
        return text
