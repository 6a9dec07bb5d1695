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
from zopro_tui.launch import RunPlan, find_recipes, parse_overrides, plan_run


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
    """Pick a recipe, type `--set` overrides, press enter: the recipe is validated before anything starts."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.recipes = find_recipes(root)
        self.chosen: Path | None = self.recipes[0] if self.recipes else None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="new-run"):
            yield Label("Start a run", classes="dialog-title")
            if self.recipes:
                yield Label("recipe (enter picks it):")
                yield OptionList(
                    *[Option(self.describe(path), id=str(i)) for i, path in enumerate(self.recipes)],
                    id="recipes",
                )
            else:
                yield Static("no recipes found in ./recipes or next to the runs folder; type a recipe path:")
                yield Input(placeholder="path/to/recipe.toml", id="recipe-path")
            yield Label("overrides (key.path=value, separated by spaces):")
            yield Input(placeholder="train.iterations=2 seed=3", id="overrides")
            yield Static("", id="new-run-error")
            yield Static(
                f"runs go to {self.root}/  ·  enter: start  ·  tab: next field  ·  esc: cancel",
                classes="dialog-detail",
            )

    def describe(self, path: Path) -> str:
        try:
            where = path.parent.relative_to(Path.cwd())
        except ValueError:
            where = path.parent
        return f"{path.stem}  ({where}/)"

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

    @on(Input.Submitted, "#overrides")
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
            plan = plan_run(
                self.chosen, parse_overrides(self.query_one("#overrides", Input).value), self.root
            )
        except RecipeError as problem:
            error.update(Text(str(problem), style="red"))
            return
        self.dismiss(plan)

    def action_cancel(self) -> None:
        self.dismiss(None)
