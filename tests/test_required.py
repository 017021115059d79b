"""The require-flags (tests/required.py): a component that cannot be had skips its tests on a
laptop and fails them where its flag is 1, and CI's `make test` runs with every flag at 1."""
import os
import subprocess
from pathlib import Path

import pytest

from required import REQUIRE, unavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("component", sorted(REQUIRE))
def test_a_missing_component_skips_without_its_flag_and_fails_with_it(component, monkeypatch):
    flag = REQUIRE[component]
    monkeypatch.delenv(flag, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"no {component}: gone.*set {flag}=1"):
        unavailable(component, "gone")
    monkeypatch.setenv(flag, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{component} required \\({flag}=1\\): gone"):
        unavailable(component, "gone")


def test_ci_runs_make_test_with_every_require_flag_set(tmp_path):
    """.ci/run itself, with a `make` that only records the environment each target gets."""
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nenv | grep "^DCLUSTER_REQUIRE_" | sort > "$RECORD_DIR/$1"\n')
    fake.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("DCLUSTER_REQUIRE_")}
    env.update(PATH=f"{fake.parent}:{env['PATH']}", RECORD_DIR=str(tmp_path))
    subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, check=True, timeout=60)
    assert (tmp_path / "test").read_text().split() == sorted(f"{flag}=1"
                                                             for flag in REQUIRE.values())
