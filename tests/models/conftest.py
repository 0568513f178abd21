"""Model-test parameterisation: every test taking an argument named `mixer` runs once per registered mixer.

The mixer list is `models.mixer_names()`, so a new mixer file (registered and imported in
`models/__init__.py`) is covered by tests/models/test_mixers.py without editing any test. Test-time
options of a mixer come from `tests/models/model_testing.py` (see `mixer_test_overrides`).
"""

import pytest

import models


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
  if "mixer" in metafunc.fixturenames:
    metafunc.parametrize("mixer", models.mixer_names(), scope="module")
