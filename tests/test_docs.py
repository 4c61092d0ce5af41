"""The documentation: the MkDocs site builds with no broken link, covers every command and option
of ``fedcare --help``, and the README stays a five-minute read."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import typer

from simulations import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    """``(path, command)`` for ``command`` and every sub-command under it, depth first."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            if not sub.hidden:
                yield from _commands(sub, (*path, name))


def _docs_text() -> str:
    """Every page's Markdown, the generated run-settings reference included."""
    spec = importlib.util.spec_from_file_location("generated", DOCS / "hooks" / "generated.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    pages = sorted(DOCS.rglob("*.md"))
    return "\n".join(p.read_text() for p in pages) + hook.render_run_settings()


def test_the_site_builds_strictly_offline(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a page missing from the nav or a
    missing image fails the build (and with it the README's test command, which CI runs)."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {"index.html", "run-settings/index.html", "privacy/index.html"} <= pages
    assert "benchmark-results/RESULTS/index.html" in pages
    reference = (site / "run-settings" / "index.html").read_text()
    assert "dp.target-epsilon" in reference and "must be below 1/n_train" in reference
    api = (site / "api" / "privacy" / "index.html").read_text()  # mkdocstrings, numpy style
    assert 'id="client.secure_random.SecureRandom"' in api
    for html in site.rglob("*.html"):  # theme.font: false
        assert "fonts.googleapis.com" not in html.read_text(), html


def test_every_command_and_option_of_fedcare_help_is_in_the_docs():
    """Every command of ``fedcare --help``, recursively, and every option it shows (its long
    names, ``--no-...`` forms included) is named somewhere in the documentation pages."""
    text = _docs_text()
    missing = []
    for path, command in _commands(typer.main.get_command(cli.app)):
        name = " ".join(path)
        if path and f"fedcare {name}" not in text and f"`{name} " not in text:
            missing.append(f"command `fedcare {name}`")
        for param in command.params:
            if getattr(param, "hidden", False):  # not shown by --help
                continue
            for option in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                named = re.search(re.escape(option) + r"(?![\w-])", text)
                if option.startswith("--") and option != "--help" and not named:
                    missing.append(f"`fedcare {name} {option}`".replace("  ", " "))
    assert not missing, "not in docs/*.md: " + ", ".join(missing)


def test_the_readme_is_at_most_200_lines_and_its_links_resolve():
    """``wc -l README.md`` <= 200, and every relative link (a docs page, a file, a page's
    heading) points at something that exists: GitHub shows the README, not the built site."""
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    links = re.findall(r"\]\(([^)#]+)(?:#([^)]+))?\)", readme)
    assert len(links) >= 10
    for target, anchor in links:
        if target.startswith(("http://", "https://")):
            continue
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / target).read_text(), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links {target}#{anchor}: no such heading"


def test_the_default_policy_block_in_the_deployment_page_is_fedcares_default():
    """docs/deployment.md shows fedcare's default policy: every key of ``DEFAULT_POLICY`` with
    its value (the keys commented out there have no fixed default), nothing else."""
    import tomllib

    from client.policy import DEFAULT_POLICY

    page = (REPO / "docs" / "deployment.md").read_text()
    block = page.split("# fedcare's default policy for a deployed hospital\n", 1)[1]
    shown = tomllib.loads(block.split("```", 1)[0])
    default = tomllib.loads(DEFAULT_POLICY.as_toml())
    assert shown == default
