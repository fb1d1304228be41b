"""The documents stay true: the config reference is regenerated with the dataclasses,
links stay inside the repository, every ``--set`` key they show exists, and the
metrics table covers what a run writes."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    gen = _generator()
    assert gen.OUT.read_text() == gen.render(), \
        "docs/config-reference.md is stale: run python docs/gen_config_reference.py"


def test_config_reference_has_every_key():
    from fusedrl.config import Config

    text = (ROOT / "docs" / "config-reference.md").read_text()
    documented = set(re.findall(r"^- \*\*`([a-z_.]+)`\*\*", text, re.M))
    expected = set()

    def keys(cls, prefix):  # nested sections (algorithm.filter_groups) and their keys
        for g in dataclasses.fields(cls):
            expected.add(f"{prefix}{g.name}")
            if dataclasses.is_dataclass(g.default_factory):
                keys(g.default_factory, f"{prefix}{g.name}.")

    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory):
            keys(f.default_factory, f"{f.name}.")
        else:
            expected.add(f.name)
    assert documented == expected


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped, spaces to dashes.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "DESIGN.md" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT), f"{page.name}: {target} points outside"
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no #{anchor}"


def test_no_reference_to_a_design_file_outside_docs():
    stale = []
    for path in [*ROOT.glob("fusedrl/**/*.py"), *ROOT.glob("scheduler/*.py"),
                 *ROOT.glob("kernels/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("examples/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<!docs/)DESIGN\.md|\.\./shared", line):
                stale.append(f"{path.relative_to(ROOT)}:{n}")
    stale = [s for s in stale if not s.startswith("tests/test_docs.py")]  # its own checks
    assert not stale, stale


def _config_key_exists(key: str) -> bool:
    from fusedrl.config import Config

    cls = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        f = fields[part]
        cls = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_set_key_shown_exists(page):
    keys = re.findall(r"--set\s+([a-z_.]+)=", page.read_text().replace("\\\n", " "))
    placeholders = {"key", "section.key"}  # "--set key=value" in prose
    missing = sorted({k for k in keys if k not in placeholders and not _config_key_exists(k)})
    assert not missing, f"{page.name} shows --set keys the config does not have: {missing}"


def _documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "user-guide.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row.split("|")[1]
        last = None
        for token in re.findall(r"`([^`]+)`", first_cell):
            if token.startswith("/") and last:
                token = last.rsplit("/", 1)[0] + token
            keys.add(token)
            last = token
    return keys


@pytest.mark.slow  # one tiny training iteration
def test_metrics_table_covers_a_run(tmp_path):
    from fusedrl.cli.train import train
    from fusedrl.config import load_config

    cfg = load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                             "ppo.micro_batch_size=4", "generation.max_new_tokens=4",
                             "data.num_prompts=16", "trainer.iterations=1"])
    (metrics,) = train(cfg, tmp_path / "run", show_progress=False)
    undocumented = sorted(set(metrics) - _documented_metrics())
    assert not undocumented, f"metrics missing from docs/user-guide.md: {undocumented}"
