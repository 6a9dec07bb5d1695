"""Modal dialogs: confirm a destructive action, and start a new run from a recipe with overrides."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from engine.recipe import RecipeError
from zopro_tui.launch import RunPlan, default_recipe, find_recipes, parse_settings, plan_run


class ConfirmModal(ModalScreen[bool]):
    """Yes or no, with y / n / escape."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str = ""):
        super().__init__()
        self.question, self.detail = question, detail

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            if self.detail:
                yield Static(self.detail, classes="dialog-detail")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class NewRunModal(ModalScreen[RunPlan | None]):
    """Pick a recipe, type `--set` overrides (and, for a sweep, a grid), press enter: the recipe is
    validated before anything starts. `queue`: the dialog adds to the queue instead of starting now."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, root: Path, *, queue: bool = False):
        super().__init__()
        self.root = root
        self.queue = queue
        self.recipes = find_recipes(root)
        self.preselected = default_recipe(self.recipes)
        self.chosen: Path | None = self.recipes[self.preselected] if self.recipes else None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="new-run"):
            yield Static(
                "Queue a run or a sweep: it starts when those before it end"
                if self.queue
                else "Start a run now (with a sweep grid: queue a sweep)",
                classes="dialog-title",
            )
            if self.recipes:
                yield Static("recipe (enter picks it):")
                yield OptionList(
                    *[Option(self.describe(i, path), id=str(i)) for i, path in enumerate(self.recipes)],
                    id="recipes",
                    compact=True,
                )
            else:
                yield Static("no recipes found in ./recipes or next to the runs folder; type a recipe path:")
                yield Input(placeholder="path/to/recipe.toml", id="recipe-path", compact=True)
            yield Static("overrides (key.path=value, separated by spaces):")
            yield Input(placeholder="train.iterations=2 seed=3", id="overrides", compact=True)
            yield Static("sweep grid, optional (KEY=V1,V2 ...: one run per combination):")
            yield Input(placeholder="seed=0,1,2 rloo.lr=1e-3,3e-3", id="grid", compact=True)
            yield Static("", id="new-run-error")
            action = "add to the queue" if self.queue else "start now"
            yield Static(
                f"runs go to {self.root}/  ·  enter: {action}  ·  tab: next field  ·  esc: cancel",
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        if self.recipes:
            self.query_one("#recipes", OptionList).highlighted = self.preselected

    def describe(self, index: int, path: Path) -> str:
        try:
            where = path.parent.relative_to(Path.cwd())
        except ValueError:
            where = path.parent
        default = "  · the default" if index == self.preselected and path.name == "tiny.toml" else ""
        return f"{path.stem}  ({where}/){default}"

    @on(OptionList.OptionHighlighted, "#recipes")
    def highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.chosen = self.recipes[int(event.option.id or 0)]

    @on(OptionList.OptionSelected, "#recipes")
    def selected(self, event: OptionList.OptionSelected) -> None:
        self.chosen = self.recipes[int(event.option.id or 0)]
        self.query_one("#overrides", Input).focus()

    @on(Input.Submitted, "#recipe-path")
    def path_given(self) -> None:
        self.query_one("#overrides", Input).focus()

    @on(Input.Submitted, "#overrides, #grid")
    def submitted(self) -> None:
        error = self.query_one("#new-run-error", Static)
        if not self.recipes:
            text = self.query_one("#recipe-path", Input).value.strip()
            self.chosen = Path(text).expanduser() if text else None
        if self.chosen is None or not self.chosen.is_file():
            error.update(
                Text(
                    f"no recipe file {self.chosen or ''}: choose one from the list or type its path",
                    style="red",
                )
            )
            return
        try:
            overrides, grid = parse_settings(self.query_one("#overrides", Input).value)
            more, _ = parse_settings(self.query_one("#grid", Input).value.replace("--grid", " "))
            plan = plan_run(self.chosen, overrides, self.root, grid + more)
        except RecipeError as problem:
            error.update(Text(str(problem), style="red"))
            return
        self.dismiss(plan)

    def action_cancel(self) -> None:
        self.dismiss(None)
