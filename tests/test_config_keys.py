"""The key declarations (dcluster/core/config_keys.py) and what derives from them: value checks,
legacy values for the keys older runs lack, the old releases' config hashes, the generated
reference page and `dcluster train --help`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dcluster.cli import build_parser
from dcluster.core.config import ConfigError, keys_in_yaml_file
from dcluster.methods import Config
from dcluster.core.config_keys import NO_LEGACY, Key, SameAs, declarations, key
from dcluster.config_reference import PAGE, reference_markdown
from dcluster.core.config_settings import (HASH_ONLY_RELEASES, hashed_settings, setting_changes,
                                      settings_behind_hash, with_legacy)

DECLARED = declarations(Config)
FROZEN_CONFIG = (Path(__file__).resolve().parent / "fixtures" / "legacy_0dd45d7" / "run"
                 / "config.yaml")

# The config hash of each release's default config and the number of hashed keys it had,
# measured by importing that commit's dcluster/core/config.py (config_hash(Config())).
RELEASE_HASHES = [("3645733", "c5c5d252974a653b", 46), ("482ef12", "f9fe4814bbbe5df4", 47),
                  ("629576f", "58fdf81f82c34303", 48), ("231d085", "8c2cdbfbeaae64b9", 52),
                  ("ad76a52", "e15abd5336d7186d", 55), ("b62a755", "bcdb12c37f3c423e", 56)]


def test_the_committed_reference_is_the_generated_one():
    assert PAGE.read_text() == reference_markdown(), \
        "docs/configuration.md is out of date: run python -m dcluster.config_reference"


def test_the_reference_has_one_table_per_section_holding_all_its_keys():
    headings = [line for line in reference_markdown().splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings))
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(DECLARED)


def test_train_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for name, declared in DECLARED.items():
        assert any(line.startswith(f"  {name} (") for line in lines), name
    assert "  optim.lr (float, default 0.05, > 0)" in lines
    assert "  data.workers (int, default 2, >= 0, execution only)" in lines


def test_defaults_pass_their_own_checks_and_legacy_values_theirs():
    for name, declared in DECLARED.items():
        assert declared.key.doc, f"{name}: no doc"
        if declared.default != "???":
            assert declared.key.problem(declared.default) is None, name
        legacy = declared.key.legacy
        if isinstance(legacy, SameAs):
            assert DECLARED[legacy.key].key.hashed, name
        elif legacy is not NO_LEGACY:
            assert declared.key.problem(legacy) is None, name
        if declared.key.when:
            assert declared.key.when[0] in DECLARED and declared.key.when[1] in \
                DECLARED[declared.key.when[0]].key.choices, name


def test_a_hashed_key_added_since_the_first_release_declares_its_legacy_value():
    """The contributor rule: a key that the frozen release's config.yaml lacks (added since)
    and that changes results must say which value reproduces the behaviour before it."""
    frozen = keys_in_yaml_file(FROZEN_CONFIG, Config)
    for name, declared in DECLARED.items():
        if declared.key.hashed and (name not in frozen or declared.key.since):
            assert declared.key.legacy is not NO_LEGACY, f"{name}: declare legacy="
        if name in frozen:
            assert declared.key.since in ("", *HASH_ONLY_RELEASES), name
        else:  # an empty since would count it among the keys old builds hashed
            assert declared.key.since, f"{name}: declare since="


@pytest.mark.parametrize("release, old_hash, hashed_keys", RELEASE_HASHES)
def test_each_old_releases_hash_is_found_from_todays_defaults(release, old_hash, hashed_keys):
    found = settings_behind_hash(old_hash, hashed_settings(Config()), Config)
    assert found is not None and len(found) == hashed_keys
    assert set(with_legacy(found, Config)) == set(hashed_settings(Config()))


def test_keys_an_old_checkpoint_lacks_count_at_their_legacy_values():
    now = hashed_settings(Config())
    before_the_bank = {name: value for name, value in now.items()
                       if not name.startswith("clustering.bank.") and name != "clustering.features"}
    assert setting_changes(before_the_bank, now, Config) == []  # momentum's legacy 0.0: bank not in use
    bank_on = dict(now, **{"clustering.features": "training_pass"})
    assert ("clustering.bank.momentum", 0.0, 0.9) in setting_changes(
        dict(before_the_bank, **{"clustering.features": "training_pass"}), bank_on, Config)
    # MMDC's keys only count under method=mmdc, PIC's under clustering.method=pic
    other_mmdc = dict(now, **{"mmdc.k": 7, "clustering.pic.knn": 9})
    assert setting_changes(other_mmdc, now, Config) == []
    as_mmdc = dict(now, method="mmdc")
    assert setting_changes(dict(other_mmdc, method="mmdc"), as_mmdc, Config) == [("mmdc.k", 7, 10)]
    before_extract = {name: value for name, value in now.items() if name != "extract.batch_size"}
    assert setting_changes(before_extract, now, Config) == [("extract.batch_size", 256, 512)]


@pytest.mark.parametrize("bounds, value, problem", [
    ("> 0", 0, "must be positive"), (">= 0", -1, "must not be negative"),
    (">= 2", 1, "must be at least 2"), ("[0, 1)", 1.0, "must be in [0, 1)"),
    ("(0, 1]", 0.0, "must be in (0, 1]"), ("(0, 1]", 1.0, None), ("> 0", 1e-9, None),
])
def test_bounds(bounds, value, problem):
    assert Key("x", bounds=bounds).problem(value) == problem


def test_choices_name_the_allowed_values():
    assert Key("x", choices=("a", "b")).problem("c") == "must be one of a, b"
    assert Key("x", choices=("", "a")).problem("c") == "must be one of a, or empty"


def test_a_field_without_a_declaration_is_refused():
    @dataclass
    class Partly:
        declared: int = key(1, "A key.")
        bare: int = 2

    with pytest.raises(TypeError, match="bare is not declared"):
        declarations(Partly)
    with pytest.raises(ValueError, match="bounds"):
        Key("x", bounds="positive")


def test_recorded_settings_without_a_first_release_key_are_a_config_error():
    recorded = {n: v for n, v in hashed_settings(Config()).items() if n != "clustering.k"}
    with pytest.raises(ConfigError, match="'clustering.k' is missing"):
        with_legacy(recorded, Config)
