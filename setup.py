"""Build hook: ship the top-level ``data_recipes/`` inside the wheel.

The recipes live at the top of the repository (where users read and edit
them); an editable install finds them there. A regular install has no
checkout, so the build copies them into ``pfedmoap_cli/data_recipes/`` of the
built package, where :func:`pfedmoap_cli.recipes.recipes_dir` looks next.
Everything else is configured in ``pyproject.toml``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "data_recipes"
        if not self.dry_run and source.is_dir():
            target = Path(self.build_lib) / "pfedmoap_cli" / "data_recipes"
            target.mkdir(parents=True, exist_ok=True)
            for recipe in sorted(source.glob("*.toml")):
                self.copy_file(str(recipe), str(target / recipe.name))


setup(cmdclass={"build_py": BuildWithRecipes})
